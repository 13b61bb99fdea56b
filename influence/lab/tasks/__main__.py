"""`python -m influence.lab.tasks [--out DIR] [--seed N]`: regenerate every data file."""

import argparse
from pathlib import Path

from . import DATA_DIR, write_all

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", type=Path, default=DATA_DIR, help="output folder (default: data/)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
paths = write_all(args.out, seed=args.seed)
print(f"wrote {len(paths)} files under {args.out}")
