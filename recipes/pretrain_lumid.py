"""MAE pretraining on LUMID shards, the same script under python, torchrun and deepspeed.

    python recipes/pretrain_lumid.py --config recipes/configs/demo_cpu.yaml
    torchrun --nproc_per_node 2 recipes/pretrain_lumid.py --config recipes/configs/demo_cpu.yaml
    deepspeed --num_accelerators 2 recipes/pretrain_lumid.py --deepspeed \
        --deepspeed_config recipes/configs/ds_zero2.json --config recipes/configs/demo_cpu.yaml
    # any config value can be overridden: ... train.epochs=5 output.dir=runs/try2 ; --resume continues
"""

from __future__ import annotations

import argparse
import sys

from medssl.config import load_config
from medssl.pretrain import DEFAULTS, run
from medssl.train.launch import add_launcher_args, launched


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (recipes/configs/*.yaml); defaults are the paper scale")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=5")
    add_launcher_args(parser, "continue from the newest checkpoint in output.dir")
    args = parser.parse_args(argv)
    cfg = load_config(DEFAULTS, args.config, args.overrides)
    with launched(args, cfg["train"]["device"]) as (dist, ds_config):
        run(cfg, dist, resume=args.resume, ds_config=ds_config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
