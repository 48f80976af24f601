"""The command-line side of the launchers, shared by every recipe.

Each recipe runs unchanged under `python`, `torchrun --nproc_per_node N` and
`deepspeed --num_accelerators N ... --deepspeed --deepspeed_config ds.json`; `add_launcher_args` adds
`--resume`, `--deepspeed`, `--deepspeed_config` and the `--local_rank` the DeepSpeed launcher appends, and
`launched` sets up (and finally tears down) the process group.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from medssl.train.dist import DistInfo, cleanup_distributed, setup_distributed
from medssl.train.logging import setup_logging

__all__ = ["add_launcher_args", "launched", "run_recipe"]


def add_launcher_args(parser: argparse.ArgumentParser, resume_help: str = "continue from the newest checkpoint"
                      ) -> None:
    """Add --resume, --deepspeed, --deepspeed_config and the launcher's --local_rank to `parser`."""
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("--deepspeed", action="store_true", help="train with DeepSpeed (ZeRO)")
    parser.add_argument("--deepspeed_config", help="DeepSpeed JSON config (ZeRO stage, bf16)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


@contextlib.contextmanager
def launched(args: argparse.Namespace, device: str | None) -> Iterator[tuple[DistInfo, dict | None]]:
    """(DistInfo, DeepSpeed config or None) for the launcher that started this process; cleans up at exit (after a
    failure too). A tool without the DeepSpeed arguments (`add_launcher_args`) runs under python or torchrun."""
    setup_logging()
    ds_config = None
    use_deepspeed = bool(getattr(args, "deepspeed", False))
    if getattr(args, "deepspeed_config", None):
        if not use_deepspeed:
            raise SystemExit("--deepspeed_config needs --deepspeed")
        with open(args.deepspeed_config) as f:
            ds_config = json.load(f)
    dist = setup_distributed(use_deepspeed=use_deepspeed, device=device)
    try:
        yield dist, ds_config
    except BaseException:
        cleanup_distributed(dist, failed=True)
        raise
    cleanup_distributed(dist)


def run_recipe(doc: str, defaults: Mapping[str, Any], run: Callable[..., int], argv: list[str] | None = None,
               required: tuple[str, str, str] | None = None, config_help: str = "YAML config") -> int:
    """The whole command line of a config-driven training recipe: `--config`, `section.key=value` overrides,
    the launcher arguments; then `run(cfg, dist, ds_config, resume)` under the launcher that started us.

    Args:
        doc: the recipe's description (its module docstring).
        defaults: the recipe's config defaults.
        run: the procedure.
        required: (section, key, message): a config value that must be set, else ValueError(message).
    """
    from medssl.config import load_config

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=config_help)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    add_launcher_args(parser, "continue the run in output.dir from its newest checkpoint")
    args = parser.parse_args(argv)
    cfg = load_config(defaults, args.config, args.overrides)
    if required is not None and not cfg[required[0]][required[1]]:
        raise ValueError(required[2])
    with launched(args, cfg["train"]["device"]) as (dist, ds_config):
        return run(cfg, dist, ds_config, args.resume)
