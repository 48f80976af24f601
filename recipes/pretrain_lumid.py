"""MAE pretraining on LUMID shards, the same script under python, torchrun and deepspeed.

    python recipes/pretrain_lumid.py --config recipes/configs/demo_cpu.yaml
    torchrun --nproc_per_node 2 recipes/pretrain_lumid.py --config recipes/configs/demo_cpu.yaml
    deepspeed --num_accelerators 2 recipes/pretrain_lumid.py --deepspeed \
        --deepspeed_config recipes/configs/ds_zero2.json --config recipes/configs/demo_cpu.yaml
    # any config value can be overridden: ... train.epochs=5 output.dir=runs/try2 ; --resume continues
"""

from __future__ import annotations

import argparse
import json
import sys

from medssl.config import load_config
from medssl.pretrain import DEFAULTS, run
from medssl.train.dist import cleanup_distributed, setup_distributed
from medssl.train.logging import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (recipes/configs/*.yaml); defaults are the paper scale")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=5")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output.dir")
    parser.add_argument("--deepspeed", action="store_true", help="train with DeepSpeed (ZeRO)")
    parser.add_argument("--deepspeed_config", help="DeepSpeed JSON config (ZeRO stage, bf16)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_config(DEFAULTS, args.config, args.overrides)
    ds_config = None
    if args.deepspeed_config:
        if not args.deepspeed:
            parser.error("--deepspeed_config needs --deepspeed")
        with open(args.deepspeed_config) as f:
            ds_config = json.load(f)
    dist = setup_distributed(use_deepspeed=args.deepspeed, device=cfg["train"]["device"])
    try:
        run(cfg, dist, resume=args.resume, ds_config=ds_config)
    finally:
        cleanup_distributed(dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
