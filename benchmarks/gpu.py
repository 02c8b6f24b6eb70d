"""GPU speed, memory and numerical precision of bids_qsmnet (run on a machine with a CUDA GPU).

Usage::

    python benchmarks/gpu.py --json docs/benchmarks_gpu.json --md docs/benchmarks_gpu.md
    python benchmarks/gpu.py --device cpu --quick --json /tmp/g.json --md /tmp/g.md  # a dry run
    python benchmarks/gpu.py --markdown-only --json docs/benchmarks_gpu.json \
        --md docs/benchmarks_gpu.md --notes benchmarks/gpu_notes.md

What it measures, all in one process on one GPU (so ratios are within one run):

* the card's dense limit: matmul and 3-D convolution GFLOP/s in fp32 (TF32 off), TF32 and bf16;
* inference per volume (the app's path: batch norm folded, channels-last,
  :func:`bids_qsmnet.inference.predict.predict_normalised`) for the shipped model and the
  99 M-parameter ``qsmnet`` at 160³ and 256×256×176, in each precision, with the GPU's peak
  memory, and the same volume on this machine's CPU cores for the GPU/CPU ratio;
* what the precision does to the map: the shipped model on a held-out synthetic brain, each
  GPU precision against the CPU's fp32 map (max and 99th-percentile difference, ppm) and
  against the truth (NRMSE, %);
* training throughput (one Adam step with the QSMnet loss, as the trainer runs it: bf16
  autocast around the network only) for ``qsmnet-mid`` (the shipped default's architecture,
  at the ``--preset gpu`` recipe's batch 8), ``qsmnet-slim`` (``--preset cpu``) and ``qsmnet``.

Timings are medians of ``--repeats`` calls after two warm-up calls, synchronised.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

PRECISIONS = ("fp32", "tf32", "bf16")


def _precision(torch, name: str, device):
    """Context for one precision: fp32 = TF32 off; tf32 = TF32 convolutions and matmuls (torch's
    default for cuDNN convolutions); bf16 = autocast to bfloat16 (TF32 on)."""
    tf32 = name != "fp32"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    if name == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(torch, device, fn, repeats: int, warmup: int = 2):
    """(median seconds, first-call seconds) of ``fn``."""
    _sync(torch, device)
    t0 = time.perf_counter()
    fn()
    _sync(torch, device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(repeats):
        _sync(torch, device)
        t0 = time.perf_counter()
        fn()
        _sync(torch, device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def _reset_peak(torch, device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(torch, device):
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def bench_peak(torch, device, quick: bool) -> dict:
    n = 1024 if quick else 8192
    out = {"bench": "peak", "matmul_n": n, "conv": {}, "matmul": {}}
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    size, ch = (32, 16) if quick else (128, 32)
    conv = torch.nn.Conv3d(ch, ch, 3, padding=1, bias=False).to(device).eval()
    conv = conv.to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, ch, size, size, size, device=device).contiguous(
        memory_format=torch.channels_last_3d)
    out["conv_shape"] = f"{ch}→{ch}, 3³, {size}³"
    for prec in PRECISIONS:
        with torch.inference_mode(), _precision(torch, prec, device):
            s, _ = _timed(torch, device, lambda: torch.mm(a, b), 5)
            out["matmul"][prec] = round(2 * n**3 / s / 1e9, 1)
            s, _ = _timed(torch, device, lambda: conv(x), 5)
            out["conv"][prec] = round(2 * size**3 * ch * ch * 27 / s / 1e9, 1)
    return out


def _network(arch: str):
    from bids_qsmnet.models.modelfile import load_model, resolve_model
    from bids_qsmnet.models.registry import build_network

    if arch == "default":
        return load_model(resolve_model(None)).network
    net = build_network(arch)
    return net.eval()


def bench_inference(torch, device, arch: str, shape, repeats: int, cpu_threads: int) -> list:
    import numpy as np

    from bids_qsmnet.inference.optimize import optimise_for_inference
    from bids_qsmnet.inference.predict import pad_to_multiple, predict_normalised
    from bids_qsmnet.models.flops import count_flops

    base = _network(arch)
    x = np.random.default_rng(0).normal(size=tuple(shape)).astype(np.float32)
    flops = count_flops(base, pad_to_multiple(x, base.multiple)[0].shape)["flops"]
    rows = []
    net = optimise_for_inference(base, device=device)
    for prec in PRECISIONS:
        _reset_peak(torch, device)
        with _precision(torch, prec, device):
            s, first = _timed(torch, device, lambda: predict_normalised(
                net, x, multiple=base.multiple, device=device), repeats)
        rows.append({"bench": "inference", "arch": arch, "shape": list(shape),
                     "device": str(device), "precision": prec, "seconds": round(s, 4),
                     "first_s": round(first, 3), "gflop": round(flops / 1e9, 1),
                     "tflops_per_s": round(flops / s / 1e12, 2),
                     "peak_mb": _peak_mb(torch, device)})
        print(json.dumps(rows[-1]), flush=True)
    del net
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
        cpu = torch.device("cpu")
        net = optimise_for_inference(base, device=cpu)
        reps = 1 if arch != "default" else 2
        s, first = _timed(torch, cpu, lambda: predict_normalised(
            net, x, multiple=base.multiple, device=cpu), reps, warmup=1)
        rows.append({"bench": "inference", "arch": arch, "shape": list(shape),
                     "device": f"cpu ({cpu_threads} threads)", "precision": "fp32",
                     "seconds": round(s, 3), "first_s": round(first, 3),
                     "gflop": round(flops / 1e9, 1), "tflops_per_s": round(flops / s / 1e12, 3),
                     "peak_mb": None})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_precision(torch, device, shape, cpu_threads: int) -> dict:
    """Shipped model on a held-out synthetic brain: each precision against CPU fp32."""
    import numpy as np

    from bids_qsmnet.data.synthetic import make_brain_phantom, simulate_local_field
    from bids_qsmnet.inference.predict import predict_chi
    from bids_qsmnet.metrics.scores import nrmse
    from bids_qsmnet.models.modelfile import load_model, resolve_model

    ph = make_brain_phantom(tuple(shape), rng=np.random.default_rng(4242))
    field = simulate_local_field(ph.chi, ph.mask, noise_std=0.001,
                                 rng=np.random.default_rng(1))
    torch.set_num_threads(cpu_threads or 1)
    ref = predict_chi(load_model(resolve_model(None), device="cpu"), field, ph.mask)
    out = {"bench": "precision", "shape": list(shape),
           "cpu_fp32_nrmse": round(float(nrmse(ref, ph.chi, ph.mask)), 3), "gpu": {}}
    loaded = load_model(resolve_model(None), device=device)
    for prec in PRECISIONS:
        with _precision(torch, prec, device):
            chi = predict_chi(loaded, field, ph.mask, device=device)
        diff = np.abs(chi - ref)[ph.mask]
        out["gpu"][prec] = {"max_abs_ppm": float(f"{diff.max():.3g}"),
                            "p99_abs_ppm": float(f"{np.quantile(diff, 0.99):.3g}"),
                            "nrmse": round(float(nrmse(chi, ph.chi, ph.mask)), 3)}
    return out


def bench_training(torch, device, arch: str, patch: int, batch: int, prec: str,
                   steps: int) -> dict:
    from bids_qsmnet.models.flops import count_flops
    from bids_qsmnet.models.losses import qsmnet_loss
    from bids_qsmnet.models.registry import build_network
    from bids_qsmnet.physics.dipole import dipole_kernel_torch

    torch.manual_seed(0)
    net = build_network(arch).to(device).to(memory_format=torch.channels_last_3d).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    p = patch
    x = torch.randn(batch, 1, p, p, p, device=device).contiguous(
        memory_format=torch.channels_last_3d)
    y = torch.randn(batch, 1, p, p, p, device=device) * 0.1
    m = torch.ones(batch, 1, p, p, p, device=device)
    kern = dipole_kernel_torch((p, p, p)).to(device)
    norm = {"input_mean": 0.0, "input_std": 0.02, "label_mean": 0.0, "label_std": 0.06}

    def step():
        with _precision(torch, prec, device):
            pred = net(x)
        loss = qsmnet_loss(pred.float(), y, x, m, kern, norm)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _reset_peak(torch, device)
    s, _ = _timed(torch, device, step, steps, warmup=3)
    flops = 3 * count_flops(net, (p, p, p), batch=batch)["flops"]
    row = {"bench": "training", "arch": arch, "patch": p, "batch": batch, "precision": prec,
           "device": str(device), "seconds_per_step": round(s, 4),
           "patches_per_s": round(batch / s, 1), "tflops_per_s": round(flops / s / 1e12, 2),
           "peak_mb": _peak_mb(torch, device)}
    return row


def write_markdown(meta: dict, rows: list[dict], path: str, notes: str | None = None) -> None:
    lines = ["# GPU benchmarks", "",
             f"Device: {meta['device_name']} ({meta['device']}); host {meta['cpus']} CPU "
             f"cores; torch {meta['torch']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}, "
             f"Python {meta['python']}; {meta['date']}.  Command: `{meta['command']}` (one "
             "process; medians after warm-up, synchronised).  `fp32`: TF32 off; `tf32`: "
             "TF32 convolutions/matmuls (torch's default for cuDNN convolutions, so what the "
             "app runs on a GPU); `bf16`: autocast to bfloat16.", ""]
    peak = next((r for r in rows if r["bench"] == "peak"), None)
    if peak:
        lines += ["## The card's dense limit (GFLOP/s)", "",
                  f"| kernel | {' | '.join(PRECISIONS)} |",
                  "| --- |" + " ---: |" * len(PRECISIONS),
                  f"| matmul {peak['matmul_n']}² | "
                  + " | ".join(str(peak["matmul"][p]) for p in PRECISIONS) + " |",
                  f"| conv3d {peak['conv_shape']} (channels-last) | "
                  + " | ".join(str(peak["conv"][p]) for p in PRECISIONS) + " |", ""]
    inf = [r for r in rows if r["bench"] == "inference"]
    if inf:
        lines += ["## Inference per volume (network only; batch norm folded, channels-last)",
                  "", "`× CPU`: the host CPU's time for the same volume divided by this "
                  "row's (same run).", "",
                  "| model | volume | device | precision | time (s) | first call (s) | GFLOP "
                  "| TFLOP/s | peak memory (MB) | × CPU |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in inf:
            cpu = next((c for c in inf if c["arch"] == r["arch"] and c["shape"] == r["shape"]
                        and c["device"].startswith("cpu")), None)
            ratio = f"{cpu['seconds'] / r['seconds']:.0f}" if cpu and cpu is not r else "–"
            lines.append(f"| {r['arch']} | {'×'.join(map(str, r['shape']))} | {r['device']} "
                         f"| {r['precision']} | {r['seconds']} | {r['first_s']} | {r['gflop']} "
                         f"| {r['tflops_per_s']} | {r['peak_mb'] if r['peak_mb'] else '–'} "
                         f"| {ratio} |")
        lines.append("")
    prec = next((r for r in rows if r["bench"] == "precision"), None)
    if prec:
        lines += [f"## What the precision does to the map (default model, held-out synthetic "
                  f"brain {'×'.join(map(str, prec['shape']))}, 1 ppb noise)", "",
                  f"CPU fp32: NRMSE {prec['cpu_fp32_nrmse']} % against the truth.", "",
                  "| GPU precision | max abs diff from CPU (ppm) | 99th pct (ppm) | NRMSE (%) |",
                  "| --- | ---: | ---: | ---: |"]
        for p, v in prec["gpu"].items():
            lines.append(f"| {p} | {v['max_abs_ppm']} | {v['p99_abs_ppm']} | {v['nrmse']} |")
        lines.append("")
    tr = [r for r in rows if r["bench"] == "training"]
    if tr:
        lines += ["## Training throughput (one Adam step with the QSMnet loss; autocast "
                  "around the network only, as the trainer runs it)", "",
                  "| model | patch | batch | precision | s/step | patches/s | TFLOP/s | "
                  "peak memory (MB) |", "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        for r in tr:
            lines.append(f"| {r['arch']} | {r['patch']}³ | {r['batch']} | {r['precision']} | "
                         f"{r['seconds_per_step']} | {r['patches_per_s']} | "
                         f"{r['tflops_per_s']} | {r['peak_mb']} |")
        lines.append("")
    if notes and os.path.exists(notes):
        with open(notes) as fh:
            lines += [fh.read().rstrip(), ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpu-threads", type=int, default=os.cpu_count() or 1,
                   help="threads for the CPU reference rows (0: none)")
    p.add_argument("--quick", action="store_true", help="small sizes (a dry run of the script)")
    p.add_argument("--notes", default=None,
                   help="hand-written notes appended to the markdown (benchmarks/gpu_notes.md)")
    p.add_argument("--markdown-only", action="store_true",
                   help="rewrite --md from an existing --json without measuring")
    args = p.parse_args(argv)
    if args.markdown_only:
        with open(args.json) as fh:
            data = json.load(fh)
        write_markdown(data["meta"], data["rows"], args.md, args.notes)
        return 0
    import torch

    device = torch.device(args.device)
    meta = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:]),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine()}
    rows = []

    def save(row):
        rows.extend(row if isinstance(row, list) else [row])
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
        write_markdown(meta, rows, args.md, args.notes)

    t_start = time.perf_counter()
    save(bench_peak(torch, device, args.quick))
    shapes = [(64, 64, 64)] if args.quick else [(160, 160, 160), (256, 256, 176)]
    for arch in (("qsmnet-lite",) if args.quick else ("default", "qsmnet")):
        for i, shape in enumerate(shapes):
            # the CPU reference for the 99 M network at 160³ only (minutes on a CPU)
            cpu = args.cpu_threads if (arch == "default" or i == 0) else 0
            save(bench_inference(torch, device, arch, shape, args.repeats, cpu))
    save(bench_precision(torch, device, (80, 96, 80) if args.quick else (160, 192, 160),
                         args.cpu_threads))
    print(json.dumps(rows[-1]), flush=True)
    plan = ([("qsmnet-lite", 32, 2, "tf32"), ("qsmnet-lite", 32, 2, "bf16")] if args.quick else
            [("qsmnet-mid", 48, 8, "fp32"), ("qsmnet-mid", 48, 8, "tf32"),
             ("qsmnet-mid", 48, 8, "bf16"), ("qsmnet-mid", 64, 8, "tf32"),
             ("qsmnet-slim", 48, 4, "tf32"), ("qsmnet-slim", 48, 4, "bf16"),
             ("qsmnet-slim", 48, 16, "tf32"), ("qsmnet", 64, 2, "tf32"),
             ("qsmnet", 64, 2, "bf16"), ("qsmnet", 64, 8, "tf32"), ("qsmnet", 64, 8, "bf16")])
    for arch, patch, batch, prec in plan:
        save(bench_training(torch, device, arch, patch, batch, prec,
                            steps=3 if args.quick else 10))
        print(json.dumps(rows[-1]), flush=True)
    print(f"done in {time.perf_counter() - t_start:.0f} s → {args.json}, {args.md}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
