"""Bad input through the command line: one clear line, a non-zero exit, no partial
output.

Each case builds a tiny derivative dataset (one subject, a 24³ local field of a sphere in ppm
with its brain mask), breaks one thing and runs ``bids_qsmnet.cli.run.main`` in-process with
a toy model and the Linear plugin.  It then checks

* the exit code: 2 for a bad command line (argparse), 1 for everything found later;
* stderr: exactly one line starting with ``bids_qsmnet:``, naming the offending file (or
  option) and saying what is wrong, without a traceback;
* the output folder: nothing of the subject (no ``sub-XX/`` files, no ``*_Chimap*``, no
  temporary files); only ``dataset_description.json``, ``logs/CITATION.md``, the error report
  ``sub-XX.html`` and the hidden lock files may exist.

Already tested elsewhere, and repeated here for the output and one-line checks: a missing
``bids_dir``, ``output_dir`` inside ``bids_dir`` and a label with path characters
(``test_cli.py``, through ``parse_args``), an absent participant and a missing
``MagneticFieldStrength`` (``test_participant_workflow.py``).

Three more tests: several subjects with one bad (reported and skipped, the others complete,
exit 1); the network running out of memory (one line, no mask left without its χ map); and
inference beyond the memory left (tiled instead, exit 0).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _bidsapp_fixtures import add_volume, make_dataset, make_model_file, sphere_field, write_json

from bids_qsmnet.cli.run import main

os.environ.setdefault("OMP_NUM_THREADS", "1")

SHAPE = (24, 24, 24)
FIELD = "sub-01/anat/sub-01_localfield.nii.gz"
MASK = "sub-01/anat/sub-01_desc-brain_mask.nii.gz"
SIDECAR = "sub-01/anat/sub-01_localfield.json"


@pytest.fixture(scope="module")
def volumes():
    field, mask, _ = sphere_field(SHAPE, radius=4.0)
    return field, mask.astype(np.uint8)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A toy network (channels 2, 4): inference of 24³ takes milliseconds."""
    return make_model_file(tmp_path_factory.mktemp("model") / "toy.safetensors", architecture="toy")


def _subject(ds: Path, sub: str, volumes, *, sidecar=None) -> None:
    field, mask = volumes
    add_volume(
        ds,
        f"sub-{sub}/anat/sub-{sub}_localfield.nii.gz",
        {"Units": "ppm"} if sidecar is None else sidecar,
        data=field,
    )
    add_volume(
        ds,
        f"sub-{sub}/anat/sub-{sub}_desc-brain_mask.nii.gz",
        {"Type": "Brain"},
        data=mask,
        dtype=np.uint8,
    )


@pytest.fixture
def ds(tmp_path, volumes, monkeypatch):
    """A good derivative dataset with sub-01; the working directory is moved out of the
    repository so that no stray crash file can land there."""
    monkeypatch.chdir(tmp_path)
    root = make_dataset(tmp_path / "ds", derivative=True)
    _subject(root, "01", volumes)
    return root


def _argv(ds, out, work, model, *extra):
    return [
        str(ds),
        str(out),
        "participant",
        "--model",
        str(model),
        "-w",
        str(work),
        "--plugin",
        "Linear",
        "--nprocs",
        "1",
        "--omp-nthreads",
        "1",
        "--device",
        "cpu",
        *map(str, extra),
    ]


def _run(argv, capsys) -> tuple[int, list[str], str]:
    """Exit code, the ``bids_qsmnet:`` lines of stderr, and all of stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage errors
        code = exc.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("bids_qsmnet:")], err


def _assert_no_partial_output(out: Path, subjects=("01",)) -> None:
    """Nothing of ``subjects`` in ``out`` but their error reports; no temporary files."""
    if not out.exists():
        return
    for path in out.rglob("*"):
        if not path.is_file():
            continue
        rel = path.relative_to(out).as_posix()
        assert ".tmp" not in path.name, f"half-written file left: {rel}"
        if rel.startswith(".bids_qsmnet"):  # advisory locks, empty and kept on purpose
            assert path.stat().st_size == 0, rel
        elif rel not in ("dataset_description.json", "logs/CITATION.md") and not re.fullmatch(
            r"sub-[A-Za-z0-9]+\.html", rel
        ):
            assert not any(rel.startswith(f"sub-{s}/") for s in subjects), f"partial output: {rel}"


# --------------------------------------------------------------------------- cases
#
# Each case breaks the good dataset (or the command line) and returns what to expect:
# ``code`` (exit code), ``file`` (must be named in the line: the offending path or option),
# ``says`` (fragments of the problem, all in the line), optionally ``argv`` (replaces the
# default command line) and ``extra`` (options appended to it).

CASES = {}


def case(name):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


def _rewrite_field(ds, data, affine=None, dtype=np.float32):
    add_volume(ds, FIELD, None, data=data, affine=affine, dtype=dtype)


@case("bids_dir-missing")
def _(ds, tmp, model, volumes):
    missing = tmp / "no-such-dataset"
    return {
        "argv": _argv(missing, tmp / "out", tmp / "work", model),
        "code": 2,
        "file": "no-such-dataset",
        "says": ["path does not exist"],
    }


@case("bids_dir-not-bids")
def _(ds, tmp, model, volumes):
    plain = tmp / "plain"
    plain.mkdir()
    add_volume(plain, "field.nii.gz", None)
    return {
        "argv": _argv(plain, tmp / "out", tmp / "work", model),
        "code": 1,
        "file": str(plain),
        "says": ["not a BIDS dataset", "dataset_description.json"],
    }


@case("bids_dir-description-not-json")
def _(ds, tmp, model, volumes):
    (ds / "dataset_description.json").write_text('{"Name": "x",')
    return {"code": 1, "file": str(ds / "dataset_description.json"), "says": ["not valid JSON"]}


@case("output_dir-inside-bids_dir")
def _(ds, tmp, model, volumes):
    return {
        "argv": _argv(ds, ds / "qsm", tmp / "work", model),
        "code": 2,
        "file": str(ds / "qsm"),
        "says": ["inside bids_dir", "derivatives/bids_qsmnet"],
    }


@case("participant-not-found")
def _(ds, tmp, model, volumes):
    return {
        "extra": ["--participant-label", "07"],
        "code": 1,
        "file": "sub-07",
        "says": ["not found", "available: sub-01"],
    }


@case("participant-label-path")
def _(ds, tmp, model, volumes):
    return {
        "extra": ["--participant-label", "../x"],
        "code": 2,
        "file": "../x",
        "says": ["invalid label", "letters and digits only"],
    }


@case("units-missing")
def _(ds, tmp, model, volumes):
    write_json(ds / SIDECAR, {"MagneticFieldStrength": 3.0})
    return {"code": 1, "file": FIELD, "says": ["no 'Units'"]}


@case("units-unknown")
def _(ds, tmp, model, volumes):
    write_json(ds / SIDECAR, {"Units": "gauss", "MagneticFieldStrength": 3.0})
    return {"code": 1, "file": FIELD, "says": ["unknown field units 'gauss'", "ppm, Hz, rad"]}


@case("fieldstrength-missing")
def _(ds, tmp, model, volumes):
    write_json(ds / SIDECAR, {"Units": "Hz"})
    return {"code": 1, "file": FIELD, "says": ["MagneticFieldStrength", "--b0-strength"]}


@case("echotime-missing")
def _(ds, tmp, model, volumes):
    write_json(ds / SIDECAR, {"Units": "rad", "MagneticFieldStrength": 3.0})
    return {"code": 1, "file": FIELD, "says": ["needs EchoTime"]}


@case("field-4d")
def _(ds, tmp, model, volumes):
    _rewrite_field(ds, np.stack([volumes[0]] * 4, axis=-1))
    return {"code": 1, "file": FIELD, "says": ["must be a 3-D volume", "(24, 24, 24, 4)"]}


@case("field-is-an-echo-series")
def _(ds, tmp, model, volumes):
    """Wrapped phase of three echoes in rad, named as a local field."""
    _rewrite_field(ds, np.stack([volumes[0] * k for k in (1, 2, 3)], axis=-1))
    write_json(
        ds / SIDECAR, {"Units": "rad", "MagneticFieldStrength": 3.0, "EchoTime": [0.01, 0.02, 0.03]}
    )
    return {"code": 1, "file": FIELD, "says": ["EchoTime is a list"]}


@case("field-mostly-nan")
def _(ds, tmp, model, volumes):
    field, mask = volumes
    field = field.copy()
    inside = np.argwhere(mask > 0)
    for i, j, k in inside[: int(0.02 * len(inside)) + 1]:  # 2 % of the mask: over the 1 %
        field[i, j, k] = np.nan
    field[0, 0, 0] = np.inf  # outside the mask: not counted
    _rewrite_field(ds, field)
    n = int(0.02 * len(inside)) + 1
    return {"code": 1, "file": FIELD, "says": [f"{n} NaN/Inf voxels inside the brain mask",
                                               "more than 1 %"]}


@case("field-all-zero")
def _(ds, tmp, model, volumes):
    _rewrite_field(ds, np.zeros(SHAPE))
    return {"code": 1, "file": FIELD, "says": ["zero everywhere"]}


@case("mask-other-shape")
def _(ds, tmp, model, volumes):
    add_volume(ds, MASK, None, data=volumes[1][:, :, :20], dtype=np.uint8)
    return {"code": 1, "file": MASK, "says": ["mask shape (24, 24, 20)", "(24, 24, 24)"]}


@case("mask-other-affine")
def _(ds, tmp, model, volumes):
    add_volume(
        ds, MASK, None, data=volumes[1], affine=np.diag([1.0, 1.0, 2.0, 1.0]), dtype=np.uint8
    )
    return {"code": 1, "file": MASK, "says": ["mask affine differs"]}


@case("mask-empty")
def _(ds, tmp, model, volumes):
    add_volume(ds, MASK, None, data=np.zeros(SHAPE), dtype=np.uint8)
    return {"code": 1, "file": MASK, "says": ["brain mask is empty"]}


@case("field-truncated")
def _(ds, tmp, model, volumes):
    path = ds / FIELD
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return {"code": 1, "file": FIELD, "says": ["truncated or corrupt"]}


@case("field-truncated-uncompressed")
def _(ds, tmp, model, volumes):
    (ds / FIELD).unlink()
    path = Path(add_volume(ds, FIELD[:-3], None, data=volumes[0]))
    path.write_bytes(path.read_bytes()[:30000])
    # 352 header bytes + 24³ float32 voxels
    return {"code": 1, "file": FIELD[:-3], "says": ["truncated", "55648 bytes", "has 30000"]}


@case("field-complex")
def _(ds, tmp, model, volumes):
    _rewrite_field(ds, volumes[0] * (1 + 1j), dtype=np.complex64)
    return {"code": 1, "file": FIELD, "says": ["data type complex64", "real"]}


@case("field-corrupt")
def _(ds, tmp, model, volumes):
    (ds / FIELD).write_bytes(b"this is not a NIfTI file\n" * 200)
    return {"code": 1, "file": FIELD, "says": ["cannot read the local field as NIfTI"]}


@case("affine-zero-scaling")
def _(ds, tmp, model, volumes):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(SHAPE)
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(None, code=0)
    hdr.set_sform(np.eye(4), code=1)
    hdr["srow_z"] = [0.0, 0.0, 0.0, 0.0]  # nibabel refuses to build this affine itself
    nib.save(nib.Nifti1Image(volumes[0], None, header=hdr), ds / FIELD)
    return {"code": 1, "file": FIELD, "says": ["degenerate affine", "axis 2 has zero length"]}


@case("affine-sheared")
def _(ds, tmp, model, volumes):
    sheared = np.eye(4)
    sheared[0, 1] = 0.3
    _rewrite_field(ds, volumes[0], affine=sheared)
    add_volume(ds, MASK, None, data=volumes[1], affine=sheared, dtype=np.uint8)
    return {"code": 1, "file": FIELD, "says": ["degenerate affine", "73.30°", "sheared"]}


@case("volume-enormous")
def _(ds, tmp, model, volumes):
    """A header claiming 4000³ float32 voxels (238 GiB) over a 1 kB body: refused from the
    header, before anything is allocated."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4000, 4000, 4000))
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    hdr.set_data_offset(352)
    with gzip.open(ds / FIELD, "wb") as fh:
        fh.write(hdr.binaryblock + b"\0" * 4 + b"\0" * 1000)
    return {"code": 1, "file": FIELD, "says": ["too large", "4000x4000x4000", "GiB"]}


def _write_model(model, dest: Path, *, spec_change=None, architecture=None) -> Path:
    """The tensors of ``model`` under a changed spec (safetensors written directly)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from bids_qsmnet.models.registry import architecture_config

    with safe_open(str(model), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        spec = json.loads(fh.metadata()["bids_qsmnet"])
    spec.update(spec_change or {})
    if architecture:
        spec["architecture"] = architecture_config(architecture)
    save_file(tensors, str(dest), metadata={"bids_qsmnet": json.dumps(spec)})
    return dest


@case("model-corrupt")
def _(ds, tmp, model, volumes):
    bad = tmp / "corrupt.safetensors"
    data = Path(model).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return {"extra": ["--model", bad], "code": 1, "file": str(bad), "says": ["truncated"]}


@case("model-not-safetensors")
def _(ds, tmp, model, volumes):
    bad = tmp / "checkpoint.safetensors"
    bad.write_bytes(b"PK\x03\x04 a zip of pickles, as torch.save writes it" * 50)
    return {
        "extra": ["--model", bad],
        "code": 1,
        "file": str(bad),
        "says": ["not a safetensors model file"],
    }


@case("model-newer-format")
def _(ds, tmp, model, volumes):
    newer = _write_model(model, tmp / "newer.safetensors", spec_change={"format_version": 99})
    return {
        "extra": ["--model", newer],
        "code": 1,
        "file": str(newer),
        "says": ["format_version 99", "upgrade bids_qsmnet"],
    }


@case("model-other-architecture")
def _(ds, tmp, model, volumes):
    other = _write_model(model, tmp / "other.safetensors", architecture="qsmnet-lite")
    return {
        "extra": ["--model", other],
        "code": 1,
        "file": str(other),
        "says": ["do not match the architecture"],
    }


@case("device-cuda-without-gpu")
def _(ds, tmp, model, volumes):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    return {
        "extra": ["--device", "cuda"],
        "code": 1,
        "file": "--device cuda",
        "says": ["no CUDA GPU is available", "--device cpu"],
    }


@case("group-level-device-cuda-without-gpu")
def _(ds, tmp, model, volumes):
    """Training refuses the absent device before extracting any patch."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    argv = _argv(ds, tmp / "out", tmp / "work", "toy", "--device", "cuda")
    argv[argv.index("participant")] = "group"
    return {"argv": argv, "code": 1, "file": "--device cuda",
            "says": ["no CUDA GPU is available", "--device cpu"]}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_one_line_nonzero_exit_no_partial_output(
    name, ds, tmp_path, model, volumes, capsys
):
    spec = CASES[name](ds, tmp_path, model, volumes)
    out, work = tmp_path / "out", tmp_path / "work"
    argv = spec.get("argv") or _argv(ds, out, work, model, *spec.get("extra", ()))
    code, lines, err = _run(argv, capsys)
    assert code == spec["code"], err[-3000:]
    assert len(lines) == 1, err[-3000:]
    line = lines[0]
    file = spec["file"]
    named = str(ds / file) if file.endswith((".nii", ".nii.gz")) else file
    assert named in line, line
    for fragment in spec["says"]:
        assert fragment in line, line
    assert "Traceback" not in line and "crash files" not in line, line
    # nothing reached the console from a workflow node: the pre-flight refused the input
    assert "Traceback" not in err and "crash file" not in err.lower(), err[-3000:]
    _assert_no_partial_output(Path(argv[1]))
    if code == 2:  # refused while parsing: the output folder is not even created
        assert not Path(argv[1]).exists()


# --------------------------------------------------------------------------- several subjects


def test_one_bad_subject_is_reported_and_skipped(ds, tmp_path, model, volumes, capsys,
                                                 caplog):
    """sub-02's field is a truncated .nii.gz (found when the pre-flight reads its voxels),
    sub-03's mask is of another shape (found from the headers); both before the workflow
    runs; sub-01 completes; exit 3 (some subjects failed, the others completed)."""
    field, mask = volumes
    _subject(ds, "02", volumes)
    path = ds / "sub-02/anat/sub-02_localfield.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _subject(ds, "03", volumes)
    add_volume(
        ds, "sub-03/anat/sub-03_desc-brain_mask.nii.gz", None, data=mask[:20], dtype=np.uint8
    )
    out = tmp_path / "out"
    code, lines, err = _run(_argv(ds, out, tmp_path / "work", model), capsys)
    assert code == 3, err[-3000:]
    assert len(lines) == 1, err
    assert lines[0].startswith("bids_qsmnet: 2 problem(s) in 2 of 3 subject(s); first: "), err
    assert "Traceback" not in err and "crash file" not in err.lower(), err[-3000:]
    chi = nib.load(out / "sub-01/anat/sub-01_Chimap.nii.gz")
    assert chi.shape == SHAPE and np.all(np.isfinite(chi.get_fdata()))
    assert (out / "sub-01/anat/sub-01_Chimap.json").is_file()
    _assert_no_partial_output(out, subjects=("02", "03"))
    report2 = (out / "sub-02.html").read_text()
    assert "sub-02_localfield.nii.gz: the local field file is truncated or corrupt" in report2
    report3 = (out / "sub-03.html").read_text()
    assert "sub-03_desc-brain_mask.nii.gz: mask shape (20, 24, 24)" in report3
    assert "sub-02: not processed: " in caplog.text and "sub-03: not processed: " in caplog.text
    assert not list(Path.cwd().glob("crash-*")), "crash files belong in the work dir"
    assert not (tmp_path / "work" / "crashes").exists() or not list(
        (tmp_path / "work" / "crashes").iterdir()), "the pre-flight should stop them first"


def test_a_few_nan_voxels_are_left_out_of_the_mask(ds, tmp_path, model, volumes, capsys,
                                                   caplog):
    """Two NaN voxels inside the mask (and one Inf outside): the run completes (exit 0) with
    a warning that counts them, in the log and the report; they are outside the written
    mask, and χ holds no NaN."""
    field, mask = volumes
    bad = field.copy()
    inside = np.argwhere(mask > 0)
    (i, j, k), (a, b, c) = inside[len(inside) // 2], inside[len(inside) // 3]
    bad[i, j, k] = np.nan
    bad[a, b, c] = -np.inf
    bad[0, 0, 0] = np.inf
    _rewrite_field(ds, bad)
    out = tmp_path / "out"
    code, lines, err = _run(_argv(ds, out, tmp_path / "work", model), capsys)
    assert code == 0 and not lines, err[-3000:]
    assert "2 NaN/Inf voxel(s) of the local field" in caplog.text, caplog.text
    chi = nib.load(out / "sub-01/anat/sub-01_Chimap.nii.gz").get_fdata()
    assert np.all(np.isfinite(chi))
    written = nib.load(out / "sub-01/anat/sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    assert not written[i, j, k] and not written[a, b, c]
    assert written.sum() == (mask > 0).sum() - 2
    assert chi[i, j, k] == 0 and chi[a, b, c] == 0
    report = (out / "sub-01.html").read_text()
    assert "Warnings" in report and "2 NaN/Inf voxel(s)" in report


def test_out_of_memory_in_inference_leaves_nothing(ds, tmp_path, model, capsys, monkeypatch):
    """The network runs out of memory (simulated: torch's CPU allocator fails) after the mask
    was made: one line with the way out (--tile), and no mask without its χ map."""
    import bids_qsmnet.inference.predict as predict

    def exhausted(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
            "allocate memory: you tried to allocate 68719476736 bytes."
        )

    monkeypatch.setattr(predict, "predict_chi", exhausted)
    out = tmp_path / "out"
    code, lines, err = _run(_argv(ds, out, tmp_path / "work", model), capsys)
    assert code == 1, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert "out of memory running the network on cpu for the 24x24x24 field" in lines[0]
    assert "sub-01_localfield" in lines[0] and "--tile 64" in lines[0]
    _assert_no_partial_output(out)


def test_inference_beyond_memory_is_tiled(ds, tmp_path, model, capsys, caplog, monkeypatch):
    """With 1 MiB of memory left, whole-volume inference of the toy network (2 first-level
    channels × 32 bytes per voxel × 24³ = 864 KiB) exceeds half of it: the run tiles instead,
    with at most 2¹⁹ / 64 = 8192 voxels per tile, and completes."""
    import bids_qsmnet.io.nifti as nifti

    monkeypatch.setattr(nifti, "available_memory", lambda: 1 << 20)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="bids_qsmnet.interfaces.inference"):
        code, lines, err = _run(_argv(ds, out, tmp_path / "work", model), capsys)
    assert code == 0, err[-3000:]
    assert "tiling, at most 8192 voxels per tile" in caplog.text
    chi = nib.load(out / "sub-01/anat/sub-01_Chimap.nii.gz").get_fdata()
    inside = nib.load(ds / MASK).get_fdata() > 0
    assert np.all(np.isfinite(chi)) and np.count_nonzero(chi[inside]) > 0.99 * inside.sum()


# --------------------------------------------------------------------------- folders
#
# An output or work folder the user cannot write ends the run before anything is read or
# written: one line naming the folder, with what to do where the command runs (a container's
# user against a bind mount: ``--user``; Apptainer: bind a folder you can write), exit 1.
# As root every folder is writable, so the in-process cases make ``os.access`` refuse the
# folder and ``os.getuid`` report the image's user; the subprocess cases run the command as a
# real unprivileged user (``setpriv`` when the tests run as root).

IMAGE_UID = 1000


def _refuse(monkeypatch, *refused: Path) -> None:
    """``os.access`` (as the folder check sees it) fails for ``refused``; the uid is 1000."""
    import bids_qsmnet.cli.folders as folders

    real = os.access
    denied = {str(p) for p in refused}
    monkeypatch.setattr(folders.os, "access",
                        lambda path, mode: str(path) not in denied and real(path, mode))
    monkeypatch.setattr(folders.os, "getuid", lambda: IMAGE_UID)


FOLDER_CASES = {
    # name: (what is refused, which option names it, the expected start of the message)
    "output-dir": ("out", "output_dir", "output_dir {out} is not writable by uid 1000"),
    "output-dir-parent": ("parent", "output_dir",
                          "output_dir {parent}/out cannot be created: {parent} is not writable"),
    "work-dir": ("work", "-w", "the work dir (-w) {work} is not writable by uid 1000"),
}


@pytest.mark.parametrize("container", [None, "docker", "singularity"])
@pytest.mark.parametrize("name", list(FOLDER_CASES))
def test_unwritable_folder_is_one_line(name, container, ds, tmp_path, model, capsys,
                                       monkeypatch):
    refused_key, _, expected = FOLDER_CASES[name]
    parent = tmp_path / "parent"
    out = parent / "out" if name == "output-dir-parent" else tmp_path / "out"
    work = tmp_path / "work"
    for folder in (parent, work, out) if name != "output-dir-parent" else (parent, work):
        folder.mkdir(exist_ok=True)
    refused = {"out": out, "parent": parent, "work": work}[refused_key]
    _refuse(monkeypatch, refused)
    if container:
        monkeypatch.setenv("BIDS_QSMNET_CONTAINER", container)
    else:
        monkeypatch.delenv("BIDS_QSMNET_CONTAINER", raising=False)
    before = {p: sorted(p.iterdir()) for p in (parent, work) if p.exists()}
    code, lines, err = _run(_argv(ds, out, work, model), capsys)
    assert code == 1, err
    assert err.splitlines() == lines and len(lines) == 1, err  # nothing else on the console
    line = lines[0]
    assert line.startswith("bids_qsmnet: error: " + expected.format(
        out=out, parent=parent, work=work)), line
    hint = {None: "choose a folder you can write",
            "docker": 'run --user "$(id -u):$(id -g)"',
            "singularity": "bind (-B) a folder you can write"}[container]
    assert hint in line, line
    if container == "docker":
        assert "a folder that uid 1000 can write" in line, line
    # nothing was written: no output folder content, no work dir content
    assert {p: sorted(p.iterdir()) for p in before} == before
    if out.exists():
        assert not list(out.iterdir())


def test_default_work_dir_names_the_way_out(ds, tmp_path, model, capsys, monkeypatch):
    """Without ``-w`` the work dir is a folder in the temporary directory named after the
    output folder (another user's run may have made it): the line says to give one."""
    from bids_qsmnet.cli.folders import default_work_dir

    out = tmp_path / "out"
    work = default_work_dir(out.resolve())
    _refuse(monkeypatch, work, work.parent)
    argv = _argv(ds, out, tmp_path / "unused", model)
    del argv[argv.index("-w"):argv.index("-w") + 2]
    code, lines, err = _run(argv, capsys)
    assert code == 1 and len(lines) == 1 and err.splitlines() == lines, err
    assert f"the default work dir (give one with -w) {work}" in lines[0], lines[0]


def test_output_dir_that_is_a_file(ds, tmp_path, model, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    code, lines, err = _run(_argv(ds, out / "derivatives", tmp_path / "work", model), capsys)
    assert code == 1 and len(lines) == 1 and err.splitlines() == lines, err
    assert lines[0] == (f"bids_qsmnet: error: output_dir {out}/derivatives: {out} is a file, "
                        "not a folder"), lines[0]


def _as_unprivileged() -> list[str] | None:
    """The command prefix that runs as an unprivileged user: nothing when the tests do not
    run as root, ``setpriv`` to nobody when they do (None where that cannot run this
    interpreter and package, e.g. from a folder only root may enter)."""
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    # from "/", as _cli_as runs it: the source folder in the working directory must not stand
    # in for an installed package the other user cannot reach
    probe = subprocess.run([*prefix, sys.executable, "-c", "import bids_qsmnet.cli.run"],
                           capture_output=True, timeout=120, cwd="/")
    return prefix if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def unprivileged():
    prefix = _as_unprivileged()
    if prefix is None:
        pytest.skip("cannot run this interpreter and package as an unprivileged user "
                    "(setpriv missing, or the virtual environment is in a folder only root "
                    "may enter)")
    return prefix


def _cli_as(prefix, *args, env=None):
    import subprocess
    import sys

    return subprocess.run([*prefix, sys.executable, "-m", "bids_qsmnet", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, cwd="/")


@pytest.fixture
def shared(tmp_path):
    """A folder any user may enter (pytest's temporary folders are root's alone)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="bids_qsmnet_shared_"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _world_readable_dataset(shared: Path, volumes) -> Path:
    """The good dataset where any user can read it."""
    root = make_dataset(shared / "ds", derivative=True)
    _subject(root, "01", volumes)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def test_unwritable_output_dir_for_a_real_user(shared, volumes, unprivileged):
    """A root-owned output folder (what a bind mount of a host folder is to the image's
    user): one line, exit 1, no traceback, nothing written."""
    ds = _world_readable_dataset(shared, volumes)
    out = shared / "out"
    out.mkdir()
    out.chmod(0o755 if unprivileged else 0o555)  # not root: a folder of ours we may not write
    res = _cli_as(unprivileged, ds, out, "participant", "-w", shared / "work",
                  env={"BIDS_QSMNET_CONTAINER": "docker"})
    assert res.returncode == 1, res.stderr
    assert res.stdout == "" and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"bids_qsmnet: error: output_dir {out} is not writable by uid ")
    assert '--user "$(id -u):$(id -g)"' in res.stderr
    assert not list(out.iterdir())
    assert not (shared / "work").exists()


def test_lock_file_of_another_user_is_one_line(shared, volumes, unprivileged):
    """A shared output folder (mode 1777) holding another user's lock file: the folder is
    writable, the lock file is not; the line names the file and says what to do."""
    if not unprivileged:
        pytest.skip("needs a file of another user: run the tests as root")
    ds = _world_readable_dataset(shared, volumes)
    out = shared / "out"
    out.mkdir()
    out.chmod(0o1777)
    lock = out / ".bids_qsmnet.lock"
    lock.touch(mode=0o644)
    work = shared / "work"
    work.mkdir()
    work.chmod(0o1777)
    res = _cli_as(unprivileged, ds, out, "participant", "-w", work,
                  env={"BIDS_QSMNET_CONTAINER": "docker"})
    assert res.returncode == 1, res.stderr
    assert res.stdout == "" and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"bids_qsmnet: error: {lock}: permission denied (uid 65534); "
                                 "run the container as the folder's owner"), res.stderr
    assert sorted(p.name for p in out.iterdir()) == [".bids_qsmnet.lock"]


def test_unreadable_bids_dir_for_a_real_user(shared, volumes, unprivileged):
    """An input folder this user may not read, or not even reach: a command-line error
    (exit 2) that names it, nothing written."""
    ds = _world_readable_dataset(shared, volumes)
    if not unprivileged:
        pytest.skip("needs a folder of another user: run the tests as root")
    out = shared / "out"
    ds.chmod(0o700)
    res = _cli_as(unprivileged, ds, out, "participant")
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines()[-1] == f"bids_qsmnet: error: not readable by uid 65534: {ds}"
    ds.chmod(0o755)
    (ds / "sub-01").chmod(0o700)
    res = _cli_as(unprivileged, ds / "sub-01" / "anat", out, "participant")
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines()[-1] == (
        "bids_qsmnet: error: path not accessible to uid 65534 (permission denied): "
        f"{ds / 'sub-01' / 'anat'}")
    assert "Traceback" not in res.stderr and not out.exists()


_MAIN_SCRIPT = """
import sys
from bids_qsmnet.cli.run import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    print("torch imported:", "torch" in sys.modules)
    sys.exit(code)
"""


@pytest.mark.parametrize("broken", [False, True], ids=["good-model", "corrupt-model"])
def test_multiproc_checks_the_model_in_a_worker(broken, ds, tmp_path, model):
    """With MultiProc (the default plugin) the model check runs in a process of the workers'
    forkserver: a corrupt model file is still one line and exit 1 before any subject, and the
    main process never imports torch."""
    import subprocess
    import sys

    script = tmp_path / "run_main.py"
    script.write_text(_MAIN_SCRIPT)
    use = model
    if broken:
        use = tmp_path / "corrupt.safetensors"
        data = Path(model).read_bytes()
        use.write_bytes(data[: len(data) // 2])
    argv = [a for a in _argv(ds, tmp_path / "out", tmp_path / "work", use)]
    argv[argv.index("Linear")] = "MultiProc"
    res = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert "torch imported: False" in res.stdout
    lines = [line for line in res.stderr.splitlines() if line.startswith("bids_qsmnet:")]
    if broken:
        assert res.returncode == 1, res.stderr
        assert len(lines) == 1 and str(use) in lines[0] and "truncated" in lines[0], lines
        _assert_no_partial_output(tmp_path / "out")
    else:
        assert res.returncode == 0, res.stderr
        assert not lines
        assert list((tmp_path / "out").rglob("*_Chimap.nii.gz"))
