"""Write the test files of a transfer config's tasks, for a pretraining pool that must not hold them.

    python -m benchmarks.holdout --config benchmarks/configs/pretraining.yaml --out demo_data/holdout.json
    python -m data_tools.make_demo lumid --out demo_data/lumid --holdout demo_data/holdout.json

The JSON maps each task to the files its test split comes from (`TaskData.test_files`); the pool builder
leaves out every source file that shares content with one of them (`medssl.data.holdout`), and `run_all`
checks every pretrained row's pool against every task again before it trains anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.run_all import task_specs
from benchmarks.tasks import build_task
from medssl.config import read_config


def test_files(cfg: dict) -> dict[str, list[str]]:
    """{task name: its test files} for every task of a run_all config."""
    img = int(cfg.get("img_size", 64))
    out = {}
    for spec, _ in task_specs(cfg):
        task = build_task(spec, img)
        if not task.test_files:
            raise ValueError(f"task {task.name} declares no test files: it cannot be held out of a pool")
        out[task.name] = list(task.test_files)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.holdout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="run_all config whose tasks are held out")
    p.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = p.parse_args(argv)
    files = test_files(read_config(args.config))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(files, indent=1) + "\n")
    print(f"{args.out}: " + ", ".join(f"{t} {len(f)} test files" for t, f in files.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
