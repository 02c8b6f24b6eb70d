"""Speed and memory of bids_qsmnet: inference per volume, training throughput, patch extraction.

Each measurement runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``)
is its own.  Usage::

    python benchmarks/speed.py inference --arch default --shape 160 160 160 [--tile 96]
    python benchmarks/speed.py training --arch toy --patch 64 --batch 12 --steps 5
    python benchmarks/speed.py patches --subjects 2 --shape 160 192 160 --patch 64
    python benchmarks/speed.py all --json docs/benchmarks.json   # the table in docs/benchmarks.md

Every figure is printed as one JSON line; ``all`` also writes them to ``--json``.  Timings
exclude the first (warm-up) call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _network(arch: str):
    """(network, name) for an architecture name or ``default`` (the shipped model)."""
    from bids_qsmnet.models.modelfile import load_model, resolve_model
    from bids_qsmnet.models.registry import build_network

    if arch == "default":
        loaded = load_model(resolve_model(None))
        return loaded.network, loaded
    net = build_network(arch)
    net.eval()
    return net, None


def bench_inference(args) -> dict:
    import numpy as np
    import torch

    from bids_qsmnet.inference.predict import predict_normalised

    torch.set_num_threads(args.threads)
    net, _ = _network(args.arch)
    net.eval()
    x = np.random.default_rng(0).normal(size=tuple(args.shape)).astype(np.float32)
    t0 = time.perf_counter()
    predict_normalised(net, x, multiple=net.multiple, tile=args.tile)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        predict_normalised(net, x, multiple=net.multiple, tile=args.tile)
        times.append(time.perf_counter() - t0)
    return {"bench": "inference", "arch": args.arch, "shape": list(args.shape),
            "tile": args.tile, "threads": args.threads, "first_s": round(first, 2),
            "seconds": round(min(times), 2), "peak_rss_mb": round(_peak_rss_mb())}


def bench_training(args) -> dict:
    import torch

    from bids_qsmnet.models.losses import qsmnet_loss
    from bids_qsmnet.models.registry import build_network
    from bids_qsmnet.physics.dipole import dipole_kernel_torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_network(args.arch)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    p = args.patch
    x = torch.randn(args.batch, 1, p, p, p)
    y = torch.randn(args.batch, 1, p, p, p) * 0.1
    m = torch.ones(args.batch, 1, p, p, p)
    kern = dipole_kernel_torch((p, p, p))
    norm = {"input_mean": 0.0, "input_std": 0.02, "label_mean": 0.0, "label_std": 0.06}

    def step():
        loss = qsmnet_loss(net(x), y, x, m, kern, norm)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = (time.perf_counter() - t0) / args.steps
    return {"bench": "training", "arch": args.arch, "patch": p, "batch": args.batch,
            "threads": args.threads, "seconds_per_step": round(dt, 3),
            "patches_per_s": round(args.batch / dt, 2), "peak_rss_mb": round(_peak_rss_mb())}


def bench_patches(args) -> dict:
    import numpy as np

    from bids_qsmnet.data.synthetic import make_brain_phantom, simulate_local_field
    from bids_qsmnet.training.patches import TrainingVolume, extract_patches

    vols = []
    for i in range(args.subjects):  # made before timing: this measures extraction only
        ph = make_brain_phantom(tuple(args.shape), rng=np.random.default_rng(i))
        f = simulate_local_field(ph.chi, ph.mask)
        vols.append(TrainingVolume(f, ph.chi, ph.mask, subject=f"s{i}"))
    with tempfile.TemporaryDirectory() as d:
        info = extract_patches(iter(vols), os.path.join(d, "p.h5"), patch_size=args.patch,
                               linearity_factor=4.0 if args.linearity else None)
        size_mb = os.path.getsize(os.path.join(d, "p.h5")) / 2**20
    return {"bench": "patches", "subjects": args.subjects, "shape": list(args.shape),
            "patch": args.patch, "linearity": args.linearity, "patches": info.n_patches,
            "seconds": round(info.seconds, 2),
            "seconds_per_subject": round(info.seconds / args.subjects, 2),
            "file_mb": round(size_mb), "peak_rss_mb": round(_peak_rss_mb())}


def _run_child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_all(args) -> list[dict]:
    t = str(args.threads)
    plan = [
        ["inference", "--arch", "default", "--shape", "160", "160", "160"],
        ["inference", "--arch", "default", "--shape", "256", "256", "176"],
        ["inference", "--arch", "default", "--shape", "256", "256", "176", "--tile", "128"],
        ["training", "--arch", "toy", "--patch", "64", "--batch", "12"],
        ["training", "--arch", "qsmnet-slim", "--patch", "64", "--batch", "4"],
        ["training", "--arch", "qsmnet-slim", "--patch", "48", "--batch", "4"],
        ["training", "--arch", "qsmnet", "--patch", "64", "--batch", "1", "--steps", "2"],
        ["patches", "--subjects", "2", "--shape", "160", "192", "160", "--patch", "64"],
        ["patches", "--subjects", "2", "--shape", "160", "192", "160", "--patch", "64",
         "--linearity"],
    ]
    rows = []
    for argv in plan:
        row = _run_child([*argv, "--threads", t])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def write_markdown(meta: dict, rows: list[dict], path: str) -> None:
    """The speed section of ``docs/benchmarks.md`` (replaced whole on every run)."""
    head = [
        "# Benchmarks",
        "",
        f"Machine: {meta['cpus']} CPU cores ({meta['machine']}), Python {meta['python']}, "
        f"torch {meta['torch']}; no GPU was lent for these runs.  Command: "
        f"`{meta['command']}` (each line below runs in its own process; peak RSS is that "
        "process's maximum resident memory).",
        "",
        "## Inference per volume (network only, CPU)",
        "",
        "| model | volume | tiles | time (s) | first call (s) | peak RSS (MB) |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    lines = list(head)
    for r in rows:
        if r["bench"] == "inference":
            lines.append(f"| {r['arch']} | {'×'.join(map(str, r['shape']))} | "
                         f"{r['tile'] or 'whole volume'} | {r['seconds']} | {r['first_s']} | "
                         f"{r['peak_rss_mb']} |")
    lines += ["", "## Training throughput (one Adam step incl. the QSMnet loss, CPU)", "",
              "| model | patch | batch | s/step | patches/s | peak RSS (MB) |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["bench"] == "training":
            lines.append(f"| {r['arch']} | {r['patch']}³ | {r['batch']} | "
                         f"{r['seconds_per_step']} | {r['patches_per_s']} | "
                         f"{r['peak_rss_mb']} |")
    lines += ["", "## Patch extraction (HDF5, synthetic subjects)", "",
              "| subjects | volume | patch | linearity copy | patches | s/subject | file (MB) "
              "| peak RSS (MB) |",
              "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["bench"] == "patches":
            lines.append(f"| {r['subjects']} | {'×'.join(map(str, r['shape']))} | "
                         f"{r['patch']}³ | {'yes' if r['linearity'] else 'no'} | "
                         f"{r['patches']} | {r['seconds_per_subject']} | {r['file_mb']} | "
                         f"{r['peak_rss_mb']} |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("inference", "training", "patches", "all"):
        s = sub.add_parser(name)
        s.add_argument("--threads", type=int, default=os.cpu_count() or 1)
        if name == "inference":
            s.add_argument("--arch", default="default")
            s.add_argument("--shape", type=int, nargs=3, default=(160, 160, 160))
            s.add_argument("--tile", type=int, default=None)
            s.add_argument("--repeats", type=int, default=2)
        if name == "training":
            s.add_argument("--arch", default="toy")
            s.add_argument("--patch", type=int, default=64)
            s.add_argument("--batch", type=int, default=12)
            s.add_argument("--steps", type=int, default=5)
        if name == "patches":
            s.add_argument("--subjects", type=int, default=2)
            s.add_argument("--shape", type=int, nargs=3, default=(160, 192, 160))
            s.add_argument("--patch", type=int, default=64)
            s.add_argument("--linearity", action="store_true")
        if name == "all":
            s.add_argument("--json", default="docs/benchmarks.json")
            s.add_argument("--md", default="docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.cmd == "all":
        rows = bench_all(args)
        meta = {"machine": platform.machine(), "cpus": os.cpu_count(),
                "python": platform.python_version(), "command": " ".join(sys.argv)}
        import torch

        meta["torch"] = torch.__version__
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
        write_markdown(meta, rows, args.md)
        return 0
    fn = {"inference": bench_inference, "training": bench_training,
          "patches": bench_patches}[args.cmd]
    print(json.dumps(fn(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
