"""The split build on a real engine: the parts run as tasks of a Dask `distributed` local cluster of 2 worker
processes, the worker of one part is killed mid-shard and its task retried by the scheduler, and the merged
result equals one whole run (same keys, same bytes)."""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("pydicom")
pytest.importorskip("nibabel")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

from bad_inputs import part_killed_once  # noqa: E402
from test_build_parts import PARTS, _series_part  # noqa: E402
from test_build_shards import ARGS, all_samples, make_collection, manifest  # noqa: E402

from data_tools import build_shards as bs  # noqa: E402
from data_tools.shards_build import on_dask  # noqa: E402


@pytest.mark.slow
def test_parts_as_dask_tasks_with_a_killed_worker_equal_one_whole_run(tmp_path):
    root = make_collection(tmp_path / "collection")
    whole = tmp_path / "whole"
    assert bs.main([str(root), "--out", str(whole), *ARGS]) == 0
    victim = _series_part(root)  # its part writes 70 samples: killed after 20, mid-shard
    out, log = tmp_path / "parts", tmp_path / "attempts.txt"
    task = functools.partial(part_killed_once, victim=victim, log=str(log))
    with dask.config.set({"distributed.worker.daemon": False}), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                     dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        summary = on_dask.build_on_dask([str(root), "--out", str(out), *ARGS], PARTS, client, task=task)
    attempts = [int(line) for line in log.read_text().split()]
    # the killed part ran again; a part that had finished on the killed worker may run again too (its result
    # died with the worker): that run finds its part done and redoes nothing
    assert attempts.count(victim) >= 2 and set(attempts) == set(range(PARTS))
    assert summary["parts"] == PARTS
    assert all_samples(out) == all_samples(whole)  # same keys, same bytes
    assert sorted(r["unit"] for r in manifest(out)) == sorted(r["unit"] for r in manifest(whole))


@pytest.mark.slow
def test_command_line_on_a_local_cluster(tmp_path, capsys):
    from pydicom.data import get_testdata_file

    one = [get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")]
    whole, out = tmp_path / "whole", tmp_path / "parts"
    assert bs.main([*one, "--out", str(whole), *ARGS]) == 0
    assert on_dask.main(["--parts", "2", "--local-workers", "2", "--", *one, "--out", str(out), *ARGS]) == 0
    assert "merged 2 parts" in capsys.readouterr().out
    assert all_samples(out) == all_samples(whole)
    with pytest.raises(SystemExit):
        on_dask.main(["--parts", "2"])  # no build arguments
