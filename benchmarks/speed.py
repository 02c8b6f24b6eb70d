"""Speed and memory of bids_qsmnet: inference per volume, training throughput, patch extraction.

Each measurement runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``)
is its own.  Usage::

    python benchmarks/speed.py peak                       # dense fp32 matmul / conv3d GFLOP/s
    python benchmarks/speed.py inference --arch default --shape 160 160 160 [--tile 96]
    python benchmarks/speed.py tiling --shape 160 192 160  # tiled vs whole volume, ppm
    python benchmarks/speed.py compile --arch default      # torch.compile vs eager
    python benchmarks/speed.py training --arch toy --patch 64 --batch 12 --steps 5
    python benchmarks/speed.py patches --subjects 2 --shape 160 192 160 --patch 64 [--stream]
    python benchmarks/speed.py participant --subject 01    # a whole CLI run
    python benchmarks/speed.py all --json docs/benchmarks.json   # the table in docs/benchmarks.md

Every figure is printed as one JSON line; ``all`` also writes them to ``--json``.  Timings
exclude the first (warm-up) call.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shutil
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


def _model_note(loaded) -> dict:
    """``{"model": ...}`` naming the shipped file a ``default`` row measured (its sha256), so
    a row stays attributable after the default model changes; ``{}`` for a bare network."""
    return {"model": f"sha256 {loaded.sha256[:12]}…"} if loaded is not None else {}


def _label(row: dict) -> str:
    """A row's network as the tables print it: the architecture and, for the shipped model,
    which file it was."""
    return f"{row['arch']} ({row['model']})" if row.get("model") else row["arch"]


def _gflops(flops: float, seconds: float) -> float:
    return round(flops / seconds / 1e9, 1)


def bench_peak(args) -> dict:
    """The machine's dense fp32 throughput: a matmul and the U-Nets' typical convolutions."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {"bench": "peak", "threads": args.threads}

    def timed(fn, flops, repeats=3):
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return _gflops(flops, best)

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    out["matmul_2048"] = timed(lambda: torch.mm(a, b), 2 * n**3)
    convs = {}
    with torch.inference_mode():
        for cin, cout, k, size in ((16, 16, 3, 64), (32, 32, 3, 64), (64, 64, 3, 32),
                                   (32, 32, 5, 48)):
            conv = torch.nn.Conv3d(cin, cout, k, padding=k // 2, bias=False).eval()
            x = torch.randn(1, cin, size, size, size)
            flops = 2 * size**3 * cin * cout * k**3
            name = f"conv{k}_{cin}to{cout}_{size}"
            convs[name] = timed(lambda c=conv, i=x: c(i), flops)
            conv_cl = conv.to(memory_format=torch.channels_last_3d)
            x_cl = x.to(memory_format=torch.channels_last_3d)
            convs[name + "_cl"] = timed(lambda c=conv_cl, i=x_cl: c(i), flops)
    out["conv"] = convs
    out["conv_best"] = max(convs.values())
    out["peak_rss_mb"] = round(_peak_rss_mb())
    return out


def _input(args):
    import numpy as np

    return np.random.default_rng(0).normal(size=tuple(args.shape)).astype(np.float32)


def _plan_label(network, multiple, padded, args) -> str | None:
    """How ``predict_normalised`` tiles ``padded`` under these options (None: whole volume)."""
    from bids_qsmnet.inference.predict import choose_tiles

    plan = choose_tiles(network, padded, multiple, tile=args.tile, overlap=args.overlap,
                        max_voxels=args.max_voxels)
    if plan is None:
        return None
    return (f"{plan.n_tiles} × {'×'.join(map(str, plan.sizes))}"
            f"{' exact' if plan.exact else ''}")


def bench_inference(args) -> dict:
    """Network time per volume (normalised random input; the work does not depend on values)."""
    import torch

    from bids_qsmnet.inference.optimize import optimise_for_inference
    from bids_qsmnet.inference.predict import flip_sets, pad_to_multiple, predict_flip_ensemble
    from bids_qsmnet.models.flops import count_flops

    torch.set_num_threads(args.threads)
    net, loaded = _network(args.arch)
    net.eval()
    x = _input(args)
    padded = pad_to_multiple(x, net.multiple)[0].shape
    run_net = net if args.no_optimise else optimise_for_inference(net)
    kw = {"tile": args.tile, "overlap": args.overlap, "max_voxels": args.max_voxels}
    flips = flip_sets(args.flip_axes or ())

    def run():  # what predict_chi runs (one predict_normalised pass without --flip-axes)
        predict_flip_ensemble(run_net, x, multiple=net.multiple, flip_axes=args.flip_axes or (),
                              **kw)

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    times = times or [first]  # --repeats 0: one call only (the slow 99 M network)
    # whole volume: tiles recompute their overlap; a flip ensemble repeats the whole pass
    flops = len(flips) * count_flops(net, padded)["flops"]
    return {"bench": "inference", "arch": args.arch, **_model_note(loaded),
            "shape": list(args.shape),
            "tile": _plan_label(run_net, net.multiple, padded, args)
            if len(flips) == 1 else f"whole volume × {len(flips)} flips",
            "optimised": not args.no_optimise, "threads": args.threads,
            "first_s": round(first, 2), "seconds": round(min(times), 2),
            "gflop": round(flops / 1e9, 1), "gflops_per_s": _gflops(flops, min(times)),
            "peak_rss_mb": round(_peak_rss_mb())}


def bench_tiling(args) -> dict:
    """Tiled against whole-volume inference on a synthetic brain field, in ppm.

    Configurations: cubic tiles of each ``--tiles`` edge with each ``--overlaps`` value
    (``exact``: the overlap of twice the receptive radius), and the memory planner at each
    ``--budgets`` (voxels per tile)."""
    import numpy as np
    import torch

    from bids_qsmnet.data.synthetic import make_brain_phantom, simulate_local_field
    from bids_qsmnet.inference.optimize import optimise_for_inference
    from bids_qsmnet.inference.predict import (
        choose_tiles,
        pad_to_multiple,
        predict_chi,
        receptive_radius,
    )
    from bids_qsmnet.models.modelfile import load_model, resolve_model

    torch.set_num_threads(args.threads)
    loaded = load_model(resolve_model(None))
    multiple = loaded.network.multiple
    net = optimise_for_inference(loaded.network)  # what predict_chi runs
    radius = receptive_radius(net, multiple)
    ph = make_brain_phantom(tuple(args.shape), rng=np.random.default_rng(7))
    field = simulate_local_field(ph.chi, ph.mask, noise_std=0.0)
    padded = pad_to_multiple(field, multiple)[0].shape
    t0 = time.perf_counter()
    whole = predict_chi(loaded, field, ph.mask)
    rows = {"whole volume": {"seconds": round(time.perf_counter() - t0, 2), "tiles": "1",
                             "max_abs_ppm": 0.0, "p99_abs_ppm": 0.0}}
    configs = [(f"{tile}³, overlap {ov}",
                {"tile": tile, "overlap": None if ov == "exact" else float(ov)})
               for tile in args.tiles for ov in args.overlaps]
    configs += [(f"planner, ≤ {budget:,} voxels", {"max_voxels": budget})
                for budget in args.budgets]
    for label, kw in configs:
        plan = choose_tiles(net, padded, multiple, **kw)
        t0 = time.perf_counter()
        tiled = predict_chi(loaded, field, ph.mask, **kw)
        dt = time.perf_counter() - t0
        diff = np.abs(tiled - whole)[ph.mask]
        rows[label] = {"seconds": round(dt, 2),
                       "tiles": f"{plan.n_tiles} × {'×'.join(map(str, plan.sizes))}",
                       "exact": plan.exact,
                       "max_abs_ppm": float(f"{diff.max():.3g}"),
                       "p99_abs_ppm": float(f"{np.quantile(diff, 0.99):.3g}")}
    return {"bench": "tiling", "shape": list(args.shape), "threads": args.threads,
            "receptive_radius": radius,
            "chi_rms_ppm": float(f"{np.sqrt(np.mean(whole[ph.mask] ** 2)):.3g}"),
            "tiles": rows}


def bench_compile(args) -> dict:
    """torch.compile (inductor) against eager, on the optimised network."""
    import torch

    from bids_qsmnet.inference.optimize import optimise_for_inference

    torch.set_num_threads(args.threads)
    net, loaded = _network(args.arch)
    net = optimise_for_inference(net.eval())
    x = torch.from_numpy(_input(args))[None, None]
    out = {"bench": "compile", "arch": args.arch, **_model_note(loaded),
           "shape": list(args.shape), "threads": args.threads}
    with torch.inference_mode():
        net(x)
        t0 = time.perf_counter()
        net(x)
        out["eager_s"] = round(time.perf_counter() - t0, 2)
        try:
            compiled = torch.compile(net)
            t0 = time.perf_counter()
            compiled(x)
            out["compile_first_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            compiled(x)
            out["compiled_s"] = round(time.perf_counter() - t0, 2)
        except Exception as exc:  # report why, do not hide it
            out["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    out["peak_rss_mb"] = round(_peak_rss_mb())
    return out


def bench_training(args) -> dict:
    """Adam steps with the QSMnet loss on random patches, laid out as the trainer lays them
    out (``--channels-last``: channels-last; for a network of at most 8 channels at its first
    level, the convolutions alone; ``--layout`` forces either), in fp32 or with bf16 autocast
    (``--amp``)."""
    import torch

    from bids_qsmnet.models.blocks import set_convolution_layout
    from bids_qsmnet.models.flops import count_flops
    from bids_qsmnet.models.losses import qsmnet_loss
    from bids_qsmnet.models.registry import architecture_config, build_network
    from bids_qsmnet.physics.dipole import dipole_kernel_torch
    from bids_qsmnet.training.trainer import apply_memory_layout

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_network(args.arch)
    if args.channels_last:  # as the trainer lays it out on the CPU
        net = apply_memory_layout(net, architecture_config(args.arch), torch.device("cpu"))
        if args.layout:
            set_convolution_layout(net, torch.channels_last_3d if args.layout == "convolutions"
                                   else None)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    p = args.patch
    x = torch.randn(args.batch, 1, p, p, p)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    y = torch.randn(args.batch, 1, p, p, p) * 0.1
    m = torch.ones(args.batch, 1, p, p, p)
    kern = dipole_kernel_torch((p, p, p))
    norm = {"input_mean": 0.0, "input_std": 0.02, "label_mean": 0.0, "label_std": 0.06}

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
            pred = net(x)
        loss = qsmnet_loss(pred.float(), y, x, m, kern, norm)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = (time.perf_counter() - t0) / args.steps
    # forward + backward ≈ 3 × the forward convolutions (input and weight gradients)
    flops = 3 * count_flops(net, (p, p, p), batch=args.batch)["flops"]
    return {"bench": "training", "arch": args.arch, "patch": p, "batch": args.batch,
            "channels_last": args.channels_last, "amp": args.amp, "threads": args.threads,
            **({"layout": args.layout} if args.layout else {}),
            "seconds_per_step": round(dt, 3), "patches_per_s": round(args.batch / dt, 2),
            "gflops_per_s": _gflops(flops, dt), "peak_rss_mb": round(_peak_rss_mb())}


def bench_participant(args) -> dict:
    """A whole ``bids_qsmnet … participant`` run of one example subject, in a child process;
    with ``--shape``, of subject 01 of the example dataset made at that grid (a local field in
    ppm; writing the dataset is not timed).  Nipype's node results give each node's own time;
    what the run spends outside the nodes (start-up before the first node, the gaps between
    nodes, the end after the last) is the orchestration overhead."""
    from bids_qsmnet.data.example import example_dataset_path, make_example_dataset

    with tempfile.TemporaryDirectory() as d:
        if args.shape:
            bids = str(make_example_dataset(os.path.join(d, "ds"), shape=tuple(args.shape)))
        else:
            bids = str(example_dataset_path())
        subject = args.subject
        if args.copies:
            bids, subject = _copied_dataset(bids, os.path.join(d, "copies"), args.copies)
        work = os.path.join(d, "work")
        label = [] if subject == "all" else ["--participant-label", subject]
        cmd = [sys.executable, "-m", "bids_qsmnet", bids, os.path.join(d, "out"),
               "participant", *label, "-w", work,
               "--nprocs", str(args.threads), "--omp-nthreads", str(args.threads)]
        start = time.time()
        subprocess.run(cmd, check=True, capture_output=True)
        end = time.time()
        nodes = _node_times(work)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    out = {"bench": "participant", "subject": subject, "threads": args.threads,
           "shape": list(args.shape) if args.shape else None,
           **({"copies": args.copies} if args.copies else {}),
           "seconds": round(end - start, 1), "peak_rss_mb": round(peak)}
    if nodes:
        first, last = nodes[0]["start"], max(n["end"] for n in nodes)
        gaps = sum(max(0.0, b["start"] - a["end"]) for a, b in zip(nodes, nodes[1:]))
        out.update(startup_s=round(first - start, 2), gaps_s=round(gaps, 2),
                   end_s=round(end - last, 2),
                   nodes={n["name"]: round(n["end"] - n["start"], 2) for n in nodes})
    return out


def _copied_dataset(source: str, dest: str, n: int) -> tuple[str, str]:
    """A dataset at ``dest`` with the top-level files of ``source`` and ``n`` subjects, each
    sub-01's files under its own label (symbolic links); returns it and its middle label."""
    os.makedirs(dest)
    for f in os.listdir(source):
        if not f.startswith("sub-") and os.path.isfile(os.path.join(source, f)):
            shutil.copy(os.path.join(source, f), dest)
    width = len(str(n))
    anat = os.path.join(source, "sub-01", "anat")
    for i in range(1, n + 1):
        label = f"{i:0{width}d}"
        os.makedirs(os.path.join(dest, f"sub-{label}", "anat"))
        for f in os.listdir(anat):
            os.symlink(os.path.join(anat, f), os.path.join(
                dest, f"sub-{label}", "anat", f.replace("sub-01", f"sub-{label}")))
    return dest, f"{(n + 1) // 2:0{width}d}"


def _node_times(work: str) -> list[dict]:
    """Start and end (epoch seconds) of every node that ran, from its Nipype result file."""
    import datetime

    from nipype.pipeline.engine.utils import load_resultfile

    out = []
    for path in glob.glob(os.path.join(work, "**", "result_*.pklz"), recursive=True):
        rt = load_resultfile(path).runtime
        stamp = lambda s: datetime.datetime.fromisoformat(s).timestamp()  # noqa: E731
        out.append({"name": os.path.basename(os.path.dirname(path)),
                    "start": stamp(rt.startTime), "end": stamp(rt.endTime)})
    return sorted(out, key=lambda n: n["start"])


def bench_group(args) -> dict:
    """``bids_qsmnet examples/ds-synthetic OUT group --model ARCH`` with the architecture's
    default training settings, in a child process: wall time, or, past ``--limit`` seconds,
    the steps reached by then and the time per step (the run is stopped there)."""
    from bids_qsmnet.data.example import example_dataset_path

    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "bids_qsmnet", str(example_dataset_path()),
               os.path.join(d, "out"), "group", "--model", args.arch, "-w",
               os.path.join(d, "work"), "--omp-nthreads", str(args.threads)]
        t0 = time.perf_counter()
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=args.limit)
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
        dt = time.perf_counter() - t0
        rows = _training_rows(d)
    out = {"bench": "group", "arch": args.arch, "threads": args.threads,
           "seconds": round(dt, 1) if finished else None}
    train = [r for r in rows if r.get("kind") == "train"]
    if train:
        last = train[-1]
        out.update(steps=int(last["step"]), epoch=int(last["epoch"]),
                   seconds_per_step=round(float(last["seconds"]) / int(last["step"]), 3))
    if not finished:
        out["stopped_after_s"] = round(dt, 1)
    return out


def _training_rows(folder: str) -> list[dict]:
    """The rows of the training log under ``folder`` (none if there is none yet)."""
    import csv

    logs = glob.glob(os.path.join(folder, "**", "training_log.csv"), recursive=True)
    if not logs:
        return []
    with open(logs[0], newline="") as fh:
        return list(csv.DictReader(fh))


def _procedural_field(shape):
    """The procedural brain (seed 1) of the ``refine`` and ``classical`` benches and its exact
    local field (ppm, zero outside the mask)."""
    from bids_qsmnet.data.synthetic import make_brain_phantom, simulate_local_field

    ph = make_brain_phantom(tuple(shape), rng=1)
    return ph, simulate_local_field(ph.chi, ph.mask) * ph.mask


#: the refinements timed by ``refine``: (solver, prior weight λ, TV weight)
REFINEMENTS = {"tv": (1e-4, 1e-4), "cg": (0.005, 0.0), "pcg": (0.03, 0.0)}


def bench_refine(args) -> dict:
    """The data-consistency refinement alone on a 160³ procedural brain (prior: 0.6 × its
    χ): the default model's TV refinement (its ADMM iterations and penalty scale), 30 plain CG
    iterations at a λ where they do not converge, and preconditioned CG at a λ where they do."""
    import torch

    from bids_qsmnet.inference.refine import DCSettings, dc_settings, fft_grid, refine_adaptive
    from bids_qsmnet.models.modelfile import read_model_spec, resolve_model

    torch.set_num_threads(args.threads)
    ph, field = _procedural_field(args.shape)
    lam, tv = REFINEMENTS[args.solver]
    shipped = dc_settings(read_model_spec(resolve_model("default")).inference)
    settings = DCSettings(lam, 30, tv=tv, tv_iterations=shipped.tv_iterations,
                          tv_penalty_scale=shipped.tv_penalty_scale)
    prior = 0.6 * ph.chi
    refine_adaptive(prior, field, ph.mask, settings)  # first call: allocations, FFT plans
    t0 = time.perf_counter()
    _, report = refine_adaptive(prior, field, ph.mask, settings)
    dt = time.perf_counter() - t0
    return {"bench": "refine", "solver": report["solver"], "lambda": lam, "tv": tv,
            "iterations": report["iterations_run"],
            "penalty_scale": report.get("penalty_scale"), "shape": list(args.shape),
            "fft_grid": list(fft_grid(ph.mask)),
            "threads": args.threads, "seconds": round(dt, 2),
            "peak_rss_mb": round(_peak_rss_mb())}


def bench_fftlen(args) -> dict:
    """A real 3-D FFT and its inverse (torch, float32) on cubes of each length: the cost per
    voxel of lengths with and without a large prime factor
    (:func:`bids_qsmnet.inference.refine.fast_fft_length`)."""
    import torch

    torch.set_num_threads(args.threads)
    out = {}
    for n in args.lengths:
        x = torch.randn(n, n, n)
        torch.fft.irfftn(torch.fft.rfftn(x), s=x.shape)
        t0 = time.perf_counter()
        for _ in range(4):
            torch.fft.irfftn(torch.fft.rfftn(x), s=x.shape)
        dt = (time.perf_counter() - t0) / 8
        out[str(n)] = {"ms": round(1e3 * dt, 1), "ns_per_voxel": round(1e9 * dt / n**3, 2)}
    return {"bench": "fftlen", "threads": args.threads, "lengths": out}


#: the classical inversions timed by ``classical``, as the accuracy benchmark runs them
CLASSICAL = {"tkd": {"threshold": 0.19}, "l2": {"lam": 0.03}, "tv-admm": {"lam": 1e-4,
                                                                         "n_iter": 60}}


def bench_classical(args) -> dict:
    """A classical inversion of a 160³ procedural brain's field (the baselines the app ships,
    :mod:`bids_qsmnet.physics.inversion`), after a first call."""
    import torch

    from bids_qsmnet.physics.inversion import closed_form_l2, tkd, tv_admm

    torch.set_num_threads(args.threads)
    ph, field = _procedural_field(args.shape)
    fn = {"tkd": tkd, "l2": closed_form_l2, "tv-admm": tv_admm}[args.method]
    kw = CLASSICAL[args.method]
    fn(field, ph.mask, **kw)
    t0 = time.perf_counter()
    fn(field, ph.mask, **kw)
    dt = time.perf_counter() - t0
    return {"bench": "classical", "method": args.method, "settings": kw,
            "shape": list(args.shape), "threads": args.threads, "seconds": round(dt, 2),
            "peak_rss_mb": round(_peak_rss_mb())}


def bench_patches(args) -> dict:
    """Patch extraction into HDF5.

    Default: the subjects are simulated first and the extraction alone is timed.  With
    ``--stream`` they are simulated one at a time while the store is written (the way the
    trainer's recipes feed it), so peak memory shows whether subjects are held at once.
    """
    import numpy as np

    from bids_qsmnet.data.synthetic import make_brain_phantom, simulate_local_field
    from bids_qsmnet.training.patches import TrainingVolume, extract_patches

    def volume(i):
        ph = make_brain_phantom(tuple(args.shape), rng=np.random.default_rng(i))
        f = simulate_local_field(ph.chi, ph.mask)
        return TrainingVolume(f, ph.chi, ph.mask, subject=f"s{i}")

    vols = (volume(i) for i in range(args.subjects)) if args.stream else \
        iter([volume(i) for i in range(args.subjects)])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        info = extract_patches(vols, os.path.join(d, "p.h5"), patch_size=args.patch,
                               linearity_factor=4.0 if args.linearity else None)
        size_mb = os.path.getsize(os.path.join(d, "p.h5")) / 2**20
    total = time.perf_counter() - t0
    return {"bench": "patches", "subjects": args.subjects, "shape": list(args.shape),
            "patch": args.patch, "linearity": args.linearity, "stream": args.stream,
            "patches": info.n_patches, "seconds": round(total, 2),
            "seconds_per_subject": round(total / args.subjects, 2),
            "file_mb": round(size_mb), "peak_rss_mb": round(_peak_rss_mb())}


def _run_child(argv: list[str], timeout: float = 900) -> dict:
    try:
        out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                             check=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        if argv[0] == "compile":
            return {"bench": "compile", "arch": argv[argv.index("--arch") + 1],
                    "shape": [int(v) for v in argv[argv.index("--shape") + 1:][:3]],
                    "eager_s": None, "compile_error": f"gave up after {timeout:.0f} s"}
        raise
    return json.loads(out.stdout.strip().splitlines()[-1])


PLAN = [
    ["peak"],
    ["inference", "--arch", "default", "--shape", "160", "160", "160", "--no-optimise"],
    ["inference", "--arch", "default", "--shape", "160", "160", "160"],
    ["inference", "--arch", "default", "--shape", "160", "160", "160", "--flip-axes", "0", "1"],
    ["inference", "--arch", "default", "--shape", "256", "256", "176", "--no-optimise"],
    ["inference", "--arch", "default", "--shape", "256", "256", "176"],
    ["inference", "--arch", "default", "--shape", "256", "256", "176", "--tile", "128",
     "--overlap", "0.25"],
    ["inference", "--arch", "default", "--shape", "256", "256", "176", "--max-voxels",
     "8000000"],
    ["inference", "--arch", "qsmnet", "--shape", "160", "160", "160", "--repeats", "0",
     "--no-optimise"],
    ["inference", "--arch", "qsmnet", "--shape", "160", "160", "160", "--repeats", "0"],
    ["compile", "--arch", "default", "--shape", "160", "160", "160"],
    ["tiling", "--shape", "160", "192", "160"],
    ["training", "--arch", "toy", "--patch", "64", "--batch", "12"],
    ["training", "--arch", "toy", "--patch", "32", "--batch", "20"],
    ["training", "--arch", "toy", "--patch", "32", "--batch", "20", "--channels-last"],
    ["training", "--arch", "toy", "--patch", "32", "--batch", "20", "--channels-last", "--amp"],
    ["training", "--arch", "qsmnet-slim", "--patch", "64", "--batch", "8"],
    ["training", "--arch", "qsmnet-slim", "--patch", "64", "--batch", "8", "--channels-last"],
    ["training", "--arch", "qsmnet-slim", "--patch", "48", "--batch", "4"],
    ["training", "--arch", "qsmnet", "--patch", "64", "--batch", "2", "--steps", "2"],
    ["patches", "--subjects", "2", "--shape", "160", "192", "160", "--patch", "64"],
    ["patches", "--subjects", "2", "--shape", "160", "192", "160", "--patch", "64", "--stream"],
    ["patches", "--subjects", "6", "--shape", "160", "192", "160", "--patch", "64", "--stream"],
    ["fftlen"],
    ["refine", "--solver", "tv"],
    ["refine", "--solver", "cg"],
    ["refine", "--solver", "pcg"],
    ["classical", "--method", "tkd"],
    ["classical", "--method", "l2"],
    ["classical", "--method", "tv-admm"],
    ["participant", "--subject", "01"],
    ["participant", "--subject", "03"],
    ["participant", "--subject", "01", "--shape", "160", "160", "160"],
    ["participant", "--subject", "all"],
    ["participant", "--copies", "100"],
    ["group", "--arch", "toy"],
]


#: the benches this script measures (other rows of the JSON are recorded by other scripts)
BENCHES = {argv[0] for argv in PLAN} | {"compile"}


def bench_all(args) -> list[dict]:
    t = str(args.threads)
    rows = []
    for argv in PLAN:
        if args.only and argv[0] not in args.only:
            continue
        row = _run_child([*argv, "--threads", t], timeout=480 if argv[0] == "compile" else 1800)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _fmt_shape(shape) -> str:
    return "×".join(map(str, shape))


def write_markdown(meta: dict, rows: list[dict], path: str) -> None:
    """``docs/benchmarks.md`` speed sections (replaced whole on every run)."""
    peak = next((r for r in rows if r["bench"] == "peak"), None)
    conv_best = peak["conv_best"] if peak else None
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {meta['cpus']} CPU cores ({meta['machine']}), Python {meta['python']}, "
        f"torch {meta['torch']}; {meta.get('gpu', 'no GPU')}.  "
        f"Command: `{meta['command']}` (each line below runs in its own process, one after "
        "the other on an otherwise idle machine; peak RSS is that process's maximum resident "
        "memory).  FLOPs are counted from the architecture (`bids_qsmnet.models.flops`: "
        "convolutions, 2 per multiply-accumulate; training = 3 × forward).",
        "",
    ]
    # the run that measured each kind of row: the last update that included it
    latest = {}
    for u in meta.get("updates", []):
        for bench in u["benches"]:
            latest[bench] = u
    for u in meta.get("updates", []):
        benches = [b for b in u["benches"] if latest[b] is u]
        if benches:
            lines += [f"The {', '.join(benches)} rows were measured by `{u['command']}` "
                      f"({u['date']}, same machine; a run that includes `peak` measures the "
                      "machine's limit again, so ratios stay within one run).", ""]
    lines += [
    ]
    if peak:
        lines += ["## The machine's limit (dense fp32, same run)", "",
                  "| kernel | GFLOP/s |", "| --- | ---: |",
                  f"| matmul 2048² | {peak['matmul_2048']} |"]
        for name, v in peak["conv"].items():
            lines.append(f"| {name.replace('_cl', ' (channels-last)')} | {v} |")
        lines += ["", f"Reference dense-conv throughput below: the best convolution, "
                      f"**{conv_best} GFLOP/s**.", ""]
    lines += ["## Inference per volume (network only, CPU)", "",
              "`optimised`: batch norm folded into the convolutions and channels-last 3-D "
              "layout (`bids_qsmnet.inference.optimize`, what the app runs).",
              "",
              "| model | volume | tiles | optimised | time (s) | first call (s) | GFLOP | "
              "GFLOP/s | % of conv peak | peak RSS (MB) |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["bench"] == "inference":
            pct = f"{100 * r['gflops_per_s'] / conv_best:.0f}" if conv_best else "–"
            lines.append(f"| {_label(r)} | {_fmt_shape(r['shape'])} | "
                         f"{r['tile'] or 'whole volume'} | {'yes' if r['optimised'] else 'no'} "
                         f"| {r['seconds']} | {r['first_s']} | {r['gflop']} | "
                         f"{r['gflops_per_s']} | {pct} | {r['peak_rss_mb']} |")
    for r in rows:
        if r["bench"] == "compile":
            lines += ["", f"`torch.compile` ({_label(r)}, {_fmt_shape(r['shape'])}): eager "
                          f"{r['eager_s'] if r['eager_s'] is not None else '–'} s, "
                      + (f"compiled {r['compiled_s']} s after a first call of "
                         f"{r['compile_first_s']} s." if "compiled_s" in r else
                         f"failed: {r['compile_error']}.")]
    for r in rows:
        if r["bench"] == "tiling":
            lines += ["", f"## Tiled against whole-volume inference ({_fmt_shape(r['shape'])} "
                          f"synthetic brain, default model, χ rms {r['chi_rms_ppm']} ppm)", "",
                      f"Receptive-field radius of the default model: "
                      f"{r.get('receptive_radius', '–')} voxels (NaN probe, "
                      "`bids_qsmnet.inference.predict.receptive_radius`); `exact`: every "
                      "overlap is at least twice that plus 2^depth.", "",
                      "| tiling | tiles | exact | time (s) | max abs diff (ppm) | "
                      "99th pct (ppm) |",
                      "| --- | --- | --- | ---: | ---: | ---: |"]
            for k, v in r["tiles"].items():
                exact = "–" if "exact" not in v else ("yes" if v["exact"] else "no")
                lines.append(f"| {k} | {v.get('tiles', '–')} | {exact} | {v['seconds']} | "
                             f"{v['max_abs_ppm']} | {v['p99_abs_ppm']} |")
    ref = [r for r in rows if r["bench"] == "refine"]
    if ref:
        lines += ["", "## Data-consistency refinement (CPU)", "",
                  "`bids_qsmnet.inference.refine.refine_adaptive` on a procedural brain, "
                  "prior 0.6 × its χ, after a first call: the shipped default's TV refinement "
                  "(ADMM from the network's map, 4 real FFTs an iteration, with the model "
                  "file's iterations and penalty scale), and the plain "
                  "refinement (a model file without `dc_tv`) with CG and preconditioned CG. "
                  "`FFT grid`: the mask's bounding box grown by 8 voxels, padded by 8 and "
                  "extended to fast FFT lengths (`refine.fft_grid`).",
                  "", "| solver | volume | FFT grid | λ | TV weight | iterations | "
                  "penalty scale | time (s) | peak RSS (MB) |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in ref:
            grid = _fmt_shape(r["fft_grid"]) if r.get("fft_grid") else "–"
            scale = "–" if r.get("penalty_scale") is None else f"{r['penalty_scale']:g}"
            lines.append(f"| {r['solver']} | {_fmt_shape(r['shape'])} | {grid} | "
                         f"{r['lambda']:g} | {r['tv']:g} | {r['iterations']} | {scale} | "
                         f"{r['seconds']} | {r['peak_rss_mb']} |")
    fl = [r for r in rows if r["bench"] == "fftlen"]
    if fl:
        lengths = fl[-1]["lengths"]
        lines += ["", "## FFT lengths (CPU)", "",
                  "A real 3-D FFT and its inverse (torch, float32) of an n³ cube, per transform: "
                  "lengths with a large prime factor cost 2–2.5× more per voxel, which is why the "
                  "refinement extends its grid to lengths without a prime factor above 13.", "",
                  "| n | " + " | ".join(lengths) + " |",
                  "| --- |" + " ---: |" * len(lengths),
                  "| ms | " + " | ".join(str(v["ms"]) for v in lengths.values()) + " |",
                  "| ns/voxel | " + " | ".join(str(v["ns_per_voxel"]) for v in lengths.values())
                  + " |"]
    cls = [r for r in rows if r["bench"] == "classical"]
    if cls:
        lines += ["", "## Classical inversions (CPU)", "",
                  "The baselines the app ships (`bids_qsmnet.physics.inversion`: float32 real "
                  "FFTs on torch's threads) on the same procedural brain's field, after a "
                  "first call; the settings of the accuracy benchmark's TV-ADMM.", "",
                  "| method | volume | settings | time (s) | peak RSS (MB) |",
                  "| --- | --- | --- | ---: | ---: |"]
        for r in cls:
            kw = ", ".join(f"{k} {v:g}" for k, v in r["settings"].items())
            lines.append(f"| {r['method']} | {_fmt_shape(r['shape'])} | {kw} | "
                         f"{r['seconds']} | {r['peak_rss_mb']} |")
    lines += ["", "## Training throughput (one Adam step incl. the QSMnet loss, CPU)", "",
              "`channels-last`: the trainer's layout (channels-last; for the toy, 2–4 "
              "channels, the convolutions alone, batch norm in the standard layout); "
              "`bf16`: autocast (this CPU has native bf16).", "",
              "| model | patch | batch | channels-last | bf16 | s/step | patches/s | GFLOP/s | "
              "peak RSS (MB) |",
              "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["bench"] == "training":
            lines.append(f"| {r['arch']} | {r['patch']}³ | {r['batch']} | "
                         f"{'yes' if r.get('channels_last') else 'no'} | "
                         f"{'yes' if r.get('amp') else 'no'} | {r['seconds_per_step']} | "
                         f"{r['patches_per_s']} | "
                         f"{r.get('gflops_per_s', '–')} | {r['peak_rss_mb']} |")
    lines += ["", "## Patch extraction (HDF5, synthetic subjects)", "",
              "`streamed`: subjects simulated one at a time while the store is written (time "
              "includes the simulation); otherwise simulated first and only extraction is "
              "timed.", "",
              "| subjects | volume | patch | linearity copy | streamed | patches | s/subject | "
              "file (MB) | peak RSS (MB) |",
              "| ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["bench"] == "patches":
            lines.append(f"| {r['subjects']} | {_fmt_shape(r['shape'])} | "
                         f"{r['patch']}³ | {'yes' if r['linearity'] else 'no'} | "
                         f"{'yes' if r.get('stream') else 'no'} | "
                         f"{r['patches']} | {r['seconds_per_subject']} | {r['file_mb']} | "
                         f"{r['peak_rss_mb']} |")
    part = [r for r in rows if r["bench"] == "participant"]
    if part:
        lines += ["", "## Whole participant runs (`bids_qsmnet … participant`, example "
                      "dataset, CLI in a child process)", "",
                  "sub-01: a 112×128×96 local field in ppm (1 mm). sub-03: raw 3-echo GRE "
                  "(75×85×64 at 1.5 mm, Siemens integer phase): stacking, brain mask from the "
                  "magnitude, Laplacian unwrapping and echo fit, V-SHARP, resampling to 1 mm "
                  "and back, network, data consistency; everything a real subject goes "
                  "through. Peak RSS: the CLI main process only (its MultiProc workers, which "
                  "run the network, are not counted: see the inference rows).", "",
                  "| subject | seconds | peak RSS (MB) | outside the nodes (s): start-up / "
                  "between nodes / end |", "| --- | ---: | ---: | --- |"]
        for r in part:
            what = (f"sub-{r['subject']} of the example made at {_fmt_shape(r['shape'])} "
                    "(local field, ppm)" if r.get("shape") else f"sub-{r['subject']}")
            if r.get("copies"):
                what = (f"sub-{r['subject']} of a dataset of {r['copies']} copies of sub-01 "
                        "(one job of a job array)")
            if r["subject"] == "all":
                what = "the whole example dataset (3 subjects, the README's first command)"
            outside = (f"{r['startup_s']} / {r['gaps_s']} / {r['end_s']}"
                       if "startup_s" in r else "–")
            lines.append(f"| {what} | {r['seconds']} | {r['peak_rss_mb']} | {outside} |")
        timed = [r for r in part if r.get("nodes")]
        if timed:
            timed = [r for r in timed if r["subject"] != "all" and not r.get("copies")]
            lines += ["", "Each node's own time (s, from Nipype's result files; one subject):", "",
                      "| node | " + " | ".join(f"sub-{r['subject']}"
                                                 + (f" {_fmt_shape(r['shape'])}"
                                                    if r.get("shape") else "")
                                                 for r in timed) + " |",
                      "| --- |" + " ---: |" * len(timed)]
            names = list(dict.fromkeys(n for r in timed for n in r["nodes"]))
            for n in names:
                lines.append(f"| {n} | " + " | ".join(str(r["nodes"].get(n, "–"))
                                                      for r in timed) + " |")
    grp = [r for r in rows if r["bench"] == "group"]
    if grp:
        lines += ["", "## Group level (`bids_qsmnet examples/ds-synthetic OUT group --model "
                      "ARCH`, CLI in a child process)", "",
                  "The architecture's default training settings "
                  "(`bids_qsmnet.training.config.architecture_defaults`); patch extraction, "
                  "training, validation and the model file included.", "",
                  "| model | seconds | steps (epoch) | s/step |", "| --- | ---: | ---: | ---: |"]
        for r in grp:
            secs = (r["seconds"] if r.get("seconds") is not None
                    else f"stopped after {r.get('stopped_after_s')}")
            lines.append(f"| {r['arch']} | {secs} | {r.get('steps', '–')} "
                         f"({r.get('epoch', '–')}) | {r.get('seconds_per_step', '–')} |")
    lines += _container_lines([r for r in rows if r["bench"] == "container"])
    extra = meta.get("notes_file")
    if extra and os.path.exists(extra):
        with open(extra) as fh:
            lines += ["", fh.read().rstrip()]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _container_lines(rows: list[dict]) -> list[str]:
    """The container image section: rows that ``benchmarks/container.py all --record`` adds
    to the JSON (kept when the speed rows are measured again)."""
    lines = []
    for r in rows:
        runs = r["runs_s"]
        lines += ["", f"## Container image ({r['variant'].upper()})", "",
                  f"Measured by `benchmarks/container.py all --record` ({r['date']}, "
                  f"`tests/test_container_image.py` runs the same steps): Podman {r['podman']}, "
                  f"{r['cpus']} CPU cores ({r['machine']}); base image: "
                  f"{r['base_from']} ({r['base_mb']} MB"
                  + (f", made in {r['base_s']} s" if r.get("base_s") else "") + "); torch from "
                  f"{r['torch_index']}.  The build has no layer cache (a whole build).  Runs: "
                  "the example dataset's participant level, `--network none`; the χ maps of "
                  "every container run against the native run's.", "",
                  "| figure | value |", "| --- | ---: |",
                  f"| build time (s) | {r['build_s']} |",
                  f"| image size (MB, as podman counts) | {r['image_mb']} |",
                  f"| of which the virtual environment (MB) | {r['venv_mb']} |"]
        for name, seconds in runs.items():
            lines.append(f"| participant run, {_CONTAINER_RUNS.get(name, name)} (s) | "
                         f"{seconds} |")
        diff = r["max_abs_diff_ppm"]
        lines.append("| max abs χ difference to the native run (ppm) | "
                     + ("0 (identical maps)" if diff == 0 else f"{diff:.1e}") + " |")
    return lines


#: what each container run of benchmarks/container.py is
_CONTAINER_RUNS = {
    "native": "native (this machine's virtual environment)",
    "image user": "the image's user (uid 1000) on folders it owns",
    "--user": "`--user` with the caller's ids on the caller's folders",
    "apptainer-like": "the Singularity recipe's archive, run as Apptainer runs a SIF "
                      "(read-only, the caller's uid)",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    names = ("peak", "inference", "tiling", "compile", "training", "patches", "fftlen", "refine",
             "classical", "participant", "group", "all", "markdown")
    for name in names:
        s = sub.add_parser(name)
        s.add_argument("--threads", type=int, default=os.cpu_count() or 1)
        if name in ("inference", "compile"):
            s.add_argument("--arch", default="default")
            s.add_argument("--shape", type=int, nargs=3, default=(160, 160, 160))
        if name == "inference":
            s.add_argument("--tile", type=int, default=None)
            s.add_argument("--overlap", type=float, default=None,
                           help="tile overlap fraction (default: exact overlap)")
            s.add_argument("--max-voxels", type=int, default=None,
                           help="tile by the memory planner, at most this many voxels a tile")
            s.add_argument("--repeats", type=int, default=2)
            s.add_argument("--no-optimise", action="store_true")
            s.add_argument("--flip-axes", type=int, nargs="*", default=None,
                           help="time the flip ensemble over these axes (2^n passes)")
        if name == "tiling":
            s.add_argument("--shape", type=int, nargs=3, default=(160, 192, 160))
            s.add_argument("--tiles", type=int, nargs="+", default=(128,))
            s.add_argument("--overlaps", nargs="+", default=("0.25", "exact"),
                           help="overlap fractions, or 'exact'")
            s.add_argument("--budgets", type=int, nargs="+", default=(2_500_000,),
                           help="voxels per tile for the memory planner")
        if name == "training":
            s.add_argument("--arch", default="toy")
            s.add_argument("--patch", type=int, default=64)
            s.add_argument("--batch", type=int, default=12)
            s.add_argument("--steps", type=int, default=5)
            s.add_argument("--channels-last", action="store_true")
            s.add_argument("--layout", choices=("whole", "convolutions"), default=None,
                           help="with --channels-last: the whole network channels-last, or "
                                "the convolutions alone (default: the trainer's choice)")
            s.add_argument("--amp", action="store_true", help="bf16 autocast")
        if name == "patches":
            s.add_argument("--subjects", type=int, default=2)
            s.add_argument("--shape", type=int, nargs=3, default=(160, 192, 160))
            s.add_argument("--patch", type=int, default=64)
            s.add_argument("--linearity", action="store_true")
            s.add_argument("--stream", action="store_true")
        if name == "group":
            s.add_argument("--arch", default="toy")
            s.add_argument("--limit", type=float, default=900,
                           help="stop the run after this many seconds and report its pace")
        if name == "participant":
            s.add_argument("--subject", default="01",
                           help="participant label, or 'all' (the whole dataset, as the "
                                "README's first command runs it)")
            s.add_argument("--shape", type=int, nargs=3, default=None,
                           help="make the example dataset at this grid and run its sub-01")
            s.add_argument("--copies", type=int, default=None,
                           help="a dataset of this many subjects, each a copy (symbolic "
                                "links) of the example's sub-01, and run one of them: what one "
                                "job of a job array over a large dataset costs")
        if name == "refine":
            s.add_argument("--solver", choices=sorted(REFINEMENTS), default="tv")
            s.add_argument("--shape", type=int, nargs=3, default=(160, 160, 160))
        if name == "fftlen":
            s.add_argument("--lengths", type=int, nargs="+",
                           default=(142, 144, 167, 168, 175, 176, 207, 208))
        if name == "classical":
            s.add_argument("--method", choices=sorted(CLASSICAL), default="tv-admm")
            s.add_argument("--shape", type=int, nargs=3, default=(160, 160, 160))
        if name in ("all", "markdown"):
            s.add_argument("--json", default="docs/benchmarks.json")
            s.add_argument("--md", default="docs/benchmarks.md")
            s.add_argument("--notes", default="benchmarks/notes.md",
                           help="hand-written notes appended to the markdown")
        if name == "all":
            s.add_argument("--only", nargs="+", default=None, help="run only these benches")
            s.add_argument("--update", action="store_true",
                           help="with --only: replace those benches' rows in the existing "
                                "--json and keep the others")
    args = p.parse_args(argv)
    if args.cmd == "markdown":
        with open(args.json) as fh:
            data = json.load(fh)
        data["meta"]["notes_file"] = args.notes
        write_markdown(data["meta"], data["rows"], args.md)
        return 0
    if args.cmd == "all":
        rows = bench_all(args)
        if args.update and args.only and os.path.exists(args.json):
            with open(args.json) as fh:
                old = json.load(fh)
            meta = old["meta"]
            meta["notes_file"] = args.notes
            meta.setdefault("updates", []).append(
                {"command": " ".join(sys.argv), "benches": list(args.only),
                 "date": time.strftime("%Y-%m-%d")})
            rows = [r for r in old["rows"] if r["bench"] not in args.only] + rows
            with open(args.json, "w") as fh:
                json.dump({"meta": meta, "rows": rows}, fh, indent=1)
            write_markdown(meta, rows, args.md)
            return 0
        # rows that other scripts record in the same file (benchmarks/container.py) stay
        if os.path.exists(args.json):
            with open(args.json) as fh:
                rows += [r for r in json.load(fh)["rows"] if r["bench"] not in BENCHES]
        meta = {"machine": platform.machine(), "cpus": os.cpu_count(),
                "python": platform.python_version(), "command": " ".join(sys.argv),
                "notes_file": args.notes}
        import torch

        meta["torch"] = torch.__version__
        if torch.cuda.is_available():
            meta["gpu"] = torch.cuda.get_device_name(0)
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
        write_markdown(meta, rows, args.md)
        return 0
    fn = {"peak": bench_peak, "inference": bench_inference, "tiling": bench_tiling,
          "compile": bench_compile, "training": bench_training, "patches": bench_patches,
          "fftlen": bench_fftlen, "refine": bench_refine, "classical": bench_classical,
          "group": bench_group,
          "participant": bench_participant}[args.cmd]
    print(json.dumps(fn(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
