#!/usr/bin/env bash
# bids_qsmnet — dipole stage.
# consumes: localfield, mask, params
# produces: chimap.nii.gz (within the mask)
# parameter overrides (qsm-ci run --set) arrive as $IN/config.json (this method declares none)
set -euo pipefail
IN="${1:-/input}"; OUT="${2:-/output}"

# localfield.nii.gz (ppm), mask.nii.gz and params.json (B0_dir, voxel_size) are read from "$IN";
# chimap.nii.gz (χ, ppm, on the input grid, zero outside the mask) is written to "$OUT".
# The GPU is used when torch sees one; QSMCI_FORCE_CPU=1 keeps it on the CPU.
device=auto
case "${QSMCI_FORCE_CPU:-}" in 1|true|yes|on) device=cpu ;; esac
exec python3 -m bids_qsmnet.cli.qsmci "$IN" "$OUT" --device "$device"
