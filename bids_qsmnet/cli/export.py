"""``bids_qsmnet-export``: a model file as a self-contained ONNX graph (local field in ppm →
χ in ppm, the model's normalisation inside; :mod:`bids_qsmnet.inference.export`).

Exit code 0 when the file was written, 1 with a one-line cause when it was not (unknown model,
unwritable output), 2 for bad arguments.  ``--help`` imports neither torch nor onnx.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..__about__ import __version__

__all__ = ["get_parser", "main"]

PROG = "bids_qsmnet-export"
#: the ``--format`` choices
FORMATS = ("onnx",)


def get_parser() -> argparse.ArgumentParser:
    """The parser of ``bids_qsmnet-export``."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Write a bids_qsmnet model as a self-contained ONNX graph: "
        "local field in ppm (B0 along the last axis, the model's voxel size) -> chi in ppm, "
        "with the model's normalisation inside. The graph does not resample, mask or refine.")
    parser.add_argument("--version", action="version", version=f"bids_qsmnet {__version__}")
    parser.add_argument("--model", default="default",
                        help="a shipped model's name or a model file (.safetensors); "
                             "default: %(default)s")
    parser.add_argument("--format", default="onnx", choices=FORMATS,
                        help="export format; default: %(default)s")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="the file to write (its folder must exist)")
    parser.add_argument("--opset", type=int, default=17,
                        help="ONNX operator-set version (9-20); default: %(default)s")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Export as the arguments say; returns the exit code."""
    opts = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if opts.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    from ..errors import UserError
    from ..inference.export import export_onnx

    try:
        export_onnx(opts.model, opts.output, opset=opts.opset, overwrite=opts.overwrite)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
