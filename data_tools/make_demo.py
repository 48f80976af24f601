"""Build the bundled demo data sets from files that installed packages ship (nothing is downloaded).

    python -m data_tools.make_demo lumid --out demo_data/lumid   # LUMID-mini pretraining shards
    python -m data_tools.make_demo mammo --out demo_data/mammo   # synthetic mammography detection set
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; dispatches to the builder of each demo set."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.make_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="which", required=True)
    from data_tools import demo_lumid, demo_mammo

    demo_lumid.add_arguments(sub.add_parser("lumid", help="LUMID-mini shards from real shipped images"))
    demo_mammo.add_arguments(sub.add_parser("mammo", help="synthetic mammograms with COCO lesion boxes"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
