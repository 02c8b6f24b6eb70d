#!/usr/bin/env python
"""Regenerate the shipped synthetic example dataset (``examples/ds-synthetic``).

Usage::

    python scripts/make_example_dataset.py                 # rewrite examples/ds-synthetic
    python scripts/make_example_dataset.py --out /tmp/ds   # somewhere else

The dataset is a deterministic function of ``--seed`` (default: the shipped seed).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from bids_qsmnet.data.example import EXAMPLE_SEED, make_example_dataset

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "examples" / "ds-synthetic", help="dataset root"
    )
    parser.add_argument("--seed", type=int, default=EXAMPLE_SEED, help="generator seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    out = make_example_dataset(args.out, seed=args.seed, overwrite=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    logging.info("wrote %s: %.2f MB in %.1f s", out, size / 1e6, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
