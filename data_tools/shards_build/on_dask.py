"""A split build (`--part I/N` + `merge`) run as the tasks of a Dask cluster.

    python -m data_tools.shards_build.on_dask --parts 8 --local-workers 2 -- SRC ... --out OUT [build options]
    python -m data_tools.shards_build.on_dask --parts 64 --scheduler tcp://HOST:8786 -- SRC ... --out OUT ...

Each part is one task that calls `build_shards` with the same arguments and `--part I/N`; when every
task has finished, the parts are merged into OUT. The parts need a file system that every worker sees
(OUT and the sources at the same paths). A worker that dies mid-part (OOM killer, pre-emption) is
replaced by the scheduler and its task runs again (Dask retries a task whose worker died up to
`distributed.scheduler.allowed-failures` times, 3 by default): the part resumes from its own folder
like any killed part. Local workers are started non-daemonic so that a part may use `--workers K`
processes of its own; on a cluster of your own set `distributed.worker.daemon: false` for that.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from data_tools.shards_build import merge
from data_tools.shards_build.report import burned_in_line


def run_part(index: int, argv: Sequence[str], parts: int) -> int:
    """Build part `index` of `parts` with the `build_shards` arguments `argv` (a Dask task); returns `index`."""
    from data_tools.build_shards import main

    try:
        code = main([*argv, "--part", f"{index}/{parts}"])
    except SystemExit as exc:  # an argument error must fail the task, not the worker
        raise RuntimeError(f"part {index}/{parts}: build_shards refused its arguments ({exc})") from None
    if code != 0:
        raise RuntimeError(f"part {index}/{parts}: build_shards exited with {code}")
    return index


def build_on_dask(argv: Sequence[str], parts: int, client: Any,
                  task: Callable[..., int] = run_part) -> dict[str, Any]:
    """Run the `parts` parts of a build as tasks on `client` (a `distributed.Client`), then merge them.

    Args:
        argv: `build_shards` arguments (sources, `--out`, options), without `--part`.
        parts: number of parts (tasks).
        client: the Dask client whose cluster runs the tasks.
        task: the function run per part (`run_part`; tests wrap it).

    Returns:
        `merge.merge`'s summary. Raises the first task error (a part that failed, or whose worker died
        more often than the scheduler allows).
    """
    if parts < 1:
        raise ValueError(f"--parts must be >= 1, got {parts}")
    out = _out_of(argv)
    futures = client.map(task, range(parts), argv=list(argv), parts=parts, pure=False)
    client.gather(futures)
    return merge.merge(out)


def _out_of(argv: Sequence[str]) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", required=True)
    known, _ = parser.parse_known_args(list(argv))
    return known.out


def main(argv: list[str] | None = None) -> int:
    """Command line: `--parts N [--scheduler ADDRESS | --local-workers K] -- BUILD_SHARDS_ARGUMENTS`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, build_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m data_tools.shards_build.on_dask", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, required=True, help="number of parts (one Dask task each)")
    parser.add_argument("--scheduler", default=None, help="address of a running Dask scheduler")
    parser.add_argument("--local-workers", type=int, default=2,
                        help="without --scheduler: worker processes of a local cluster (default 2)")
    args = parser.parse_args(ours)
    if not build_args:
        parser.error("give the build_shards arguments after '--' (SRC ... --out OUT [options])")
    import dask
    from distributed import Client, LocalCluster

    if args.scheduler:
        with Client(args.scheduler) as client:
            summary = build_on_dask(build_args, args.parts, client)
    else:
        with dask.config.set({"distributed.worker.daemon": False}), \
                LocalCluster(n_workers=args.local_workers, threads_per_worker=1, processes=True,
                             dashboard_address=None) as cluster, Client(cluster) as client:
            summary = build_on_dask(build_args, args.parts, client)
    print(f"merged {summary['parts']} parts: {summary['shards']} shards, {summary['samples']} samples; "
          f"inputs {summary['inputs']}")
    print(burned_in_line(summary["burned_in"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
