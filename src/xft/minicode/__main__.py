"""`python -m xft.minicode --out DIR [--seed S]`: write MiniCode's splits as JSONL."""

from __future__ import annotations

import argparse
import sys

from xft.minicode.benchmark import write_splits
from xft.minicode.splits import DEFAULT_SIZES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xft.minicode", description=__doc__)
    parser.add_argument("--out", required=True, help="directory for pretrain.jsonl, train.jsonl, valid.jsonl, eval.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (0 is the published benchmark)")
    for split, size in DEFAULT_SIZES.items():
        parser.add_argument(f"--{split}-size", type=int, default=size, help=f"records in {split}.jsonl")
    args = parser.parse_args(argv)
    sizes = {split: getattr(args, f"{split}_size") for split in DEFAULT_SIZES}
    for split, path in write_splits(args.out, args.seed, sizes).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
