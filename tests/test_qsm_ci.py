"""The QSM-CI dipole-stage submission (``qsm-ci/bids-qsmnet``) and its entry point
``python -m bids_qsmnet.cli.qsmci``.

Fast tests call the entry point on a 64³ procedural brain phantom (units, grid, a tilted B0,
voxel size from params.json, bad inputs) and check the folder against what ``qsm-ci new --stage
dipole`` scaffolds.  The slow test runs the real ``qsm-ci`` tool (``--runner local``) on a 96³
phantom with B0 along z and tilted by 25°, scores the map with ``--truth`` (QSM-CI's own scorer)
and compares it with TKD scored by the same scorer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_qsmnet.cli.qsmci import main, read_params, reconstruct
from bids_qsmnet.data.synthetic import make_brain_phantom, simulate_local_field, snr_to_noise_std
from bids_qsmnet.io.nifti import InputError
from bids_qsmnet.physics.inversion import tkd

ROOT = Path(__file__).resolve().parents[1]
SUBMISSION = ROOT / "qsm-ci" / "bids-qsmnet"
#: field SNR of the phantoms (std of the noise-free field in the mask / noise std)
SNR = 10.0


def _b0(tilt_deg: float) -> np.ndarray:
    t = np.radians(tilt_deg)
    return np.array([np.sin(t), 0.0, np.cos(t)])


def _case(folder: Path, chi, mask, *, tilt_deg=0.0, voxel_size=(1.0, 1.0, 1.0), affine=None,
          params_voxel=None, seed=0) -> dict:
    """A QSM-CI dipole input folder for the phantom ``chi`` (ppm): the noisy local field, the
    mask, params.json and the truth; returns the arrays used."""
    b0 = _b0(tilt_deg)
    clean = simulate_local_field(chi, mask, voxel_size=voxel_size, b0_dir=b0)
    field = simulate_local_field(chi, mask, voxel_size=voxel_size, b0_dir=b0,
                                 noise_std=snr_to_noise_std(clean, mask, SNR), rng=seed)
    affine = np.diag([*voxel_size, 1.0]) if affine is None else affine
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(field, affine), folder / "localfield.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), folder / "mask.nii.gz")
    nib.save(nib.Nifti1Image(chi.astype(np.float32), affine), folder / "truth.nii.gz")
    params = {"TE": [1.0], "B0": 3.0, "B0_dir": b0.tolist(),
              "voxel_size": list(params_voxel or voxel_size)}
    (folder / "params.json").write_text(json.dumps(params))
    return {"field": field, "mask": mask, "chi": chi, "b0_dir": b0, "affine": affine}


def _nrmse(recon, truth, mask) -> float:
    """Demeaned NRMSE (%) in the mask: the 2016 QSM challenge's definition."""
    r, t = recon[mask] - recon[mask].mean(), truth[mask] - truth[mask].mean()
    return float(100 * np.linalg.norm(r - t) / np.linalg.norm(t))


@pytest.fixture(scope="module")
def brain64():
    ph = make_brain_phantom((64, 64, 64), rng=3)
    return ph.chi, ph.mask


# --------------------------------------------------------------------------- the entry point


def test_chimap_is_ppm_on_the_input_grid(tmp_path, brain64):
    chi, mask = brain64
    # an oblique-free but flipped, shifted grid: the output must keep the input's header
    affine = np.array([[-1.0, 0, 0, 31.5], [0, 1.0, 0, -40.0], [0, 0, 1.0, -12.0], [0, 0, 0, 1]])
    case = _case(tmp_path / "in", chi, mask, affine=affine)
    out, info = reconstruct(tmp_path / "in", tmp_path / "out", device="cpu")
    assert Path(out) == tmp_path / "out" / "chimap.nii.gz"
    img = nib.load(out)
    rec = np.asarray(img.dataobj)
    assert rec.shape == chi.shape and rec.dtype == np.float32
    assert np.allclose(img.affine, affine)
    assert not np.any(rec[~mask])
    # ppm: the in-mask regression slope onto the truth is near 1 (Hz at 3 T would be 128)
    slope = np.polyfit(chi[mask], rec[mask], 1)[0]
    assert 0.8 < slope < 1.2, slope
    assert np.corrcoef(chi[mask], rec[mask])[0, 1] > 0.95
    nrmse = _nrmse(rec, chi, mask)
    assert nrmse < 0.7 * _nrmse(tkd(case["field"], mask), chi, mask), nrmse
    assert info["name"] == "default" and info["obliquity_deg"] < 0.5
    assert info["frame_shape"] == list(chi.shape)  # 1 mm and B0 along z: nothing resampled


def test_tilted_b0_dir_is_honoured(tmp_path, brain64):
    chi, mask = brain64
    _case(tmp_path / "in", chi, mask, tilt_deg=30.0)
    out, info = reconstruct(tmp_path / "in", tmp_path / "out", device="cpu")
    assert info["obliquity_deg"] == pytest.approx(30.0, abs=1e-6)
    assert info["b0_dir"] == pytest.approx(_b0(30.0).tolist())
    rec = nib.load(out).get_fdata()
    assert rec.shape == chi.shape
    tilted = _nrmse(rec, chi, mask)
    # the same field read as if B0 were along z: the wrong dipole, a clearly worse map
    params = json.loads((tmp_path / "in" / "params.json").read_text())
    params["B0_dir"] = [0.0, 0.0, 1.0]
    (tmp_path / "in" / "params.json").write_text(json.dumps(params))
    out2, _ = reconstruct(tmp_path / "in", tmp_path / "out2", device="cpu")
    ignored = _nrmse(nib.load(out2).get_fdata(), chi, mask)
    assert tilted < 40 and ignored > tilted + 10, (tilted, ignored)


def test_voxel_size_comes_from_params(tmp_path):
    ph = make_brain_phantom((64, 64, 32), (1.0, 1.0, 2.0), rng=5)
    # the header says 1 mm isotropic; params.json says 1 × 1 × 2 mm (QSM-CI's authority)
    _case(tmp_path / "in", ph.chi, ph.mask, voxel_size=(1.0, 1.0, 2.0), affine=np.eye(4),
          params_voxel=(1.0, 1.0, 2.0))
    out, info = reconstruct(tmp_path / "in", tmp_path / "out", device="cpu")
    assert info["voxel_size"] == [1.0, 1.0, 2.0]
    assert info["frame_shape"] == [64, 64, 63]  # 62 mm along z at the model's 1 mm
    img = nib.load(out)
    assert img.shape == (64, 64, 32) and np.allclose(img.affine, np.eye(4))
    rec = img.get_fdata()
    assert np.corrcoef(ph.chi[ph.mask], rec[ph.mask])[0, 1] > 0.9


def test_read_params_normalises_b0_dir(tmp_path):
    p = tmp_path / "params.json"
    p.write_text(json.dumps({"B0_dir": [0, 3, 4], "voxel_size": [1, 1, 1.5], "B0": 7}))
    assert read_params(p) == {"b0_dir": (0.0, 0.6, 0.8), "voxel_size": (1.0, 1.0, 1.5)}


def _bad(folder: Path, kind: str) -> str:
    """Damage one input of a valid folder; returns the text the error must name."""
    params = folder / "params.json"
    if kind == "no field":
        (folder / "localfield.nii.gz").unlink()
        return "localfield.nii.gz"
    if kind == "mask off grid":
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), folder / "mask.nii.gz")
        return "mask.nii.gz"
    if kind == "empty mask":
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.uint8), np.eye(4)),
                 folder / "mask.nii.gz")
        return "mask.nii.gz"
    if kind == "no params":
        params.unlink()
        return "params.json"
    if kind == "params not JSON":
        params.write_text("{B0_dir: [0, 0, 1]")
        return "params.json"
    p = json.loads(params.read_text())
    if kind == "zero B0_dir":
        p["B0_dir"] = [0, 0, 0]
    elif kind == "no B0_dir":
        del p["B0_dir"]
    elif kind == "negative voxel_size":
        p["voxel_size"] = [1, 1, -1]
    params.write_text(json.dumps(p))
    return "params.json"


@pytest.mark.parametrize("kind", ["no field", "mask off grid", "empty mask", "no params",
                                  "params not JSON", "zero B0_dir", "no B0_dir",
                                  "negative voxel_size"])
def test_bad_input_is_one_line_naming_the_file(tmp_path, capsys, kind):
    folder = tmp_path / "in"
    rng = np.random.default_rng(0)
    chi = np.zeros((16, 16, 16), np.float32)
    chi[6:10, 6:10, 6:10] = rng.uniform(-0.1, 0.1, (4, 4, 4))
    mask = np.zeros(chi.shape, bool)
    mask[2:14, 2:14, 2:14] = True
    _case(folder, chi, mask)
    name = _bad(folder, kind)
    assert main([str(folder), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bids_qsmnet qsmci: error: "), err
    assert name in err[0]
    for key in ("B0_dir", "voxel_size"):
        if key in kind:
            assert key in err[0]
    assert not (tmp_path / "out" / "chimap.nii.gz").exists()


def test_input_folder_must_exist(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "not a folder" in capsys.readouterr().err


def test_read_params_errors_are_input_errors(tmp_path):
    p = tmp_path / "params.json"
    p.write_text("[1, 2, 3]")
    with pytest.raises(InputError, match="JSON object"):
        read_params(p)


# --------------------------------------------------------------------------- the folder


def test_folder_follows_the_qsm_ci_scaffold():
    qsm_ci = pytest.importorskip("qsm_ci")
    from qsm_ci import templates
    from qsm_ci.runner import _consumes, _parse_manifest

    algo = _parse_manifest(SUBMISSION)
    assert algo["stage"] == "dipole" and algo["slug"] == SUBMISSION.name
    assert _consumes(algo) == ["localfield", "mask", "params"]
    meta = {"stage": "dipole", "name": algo["name"], "slug": algo["slug"], "lang": "other",
            "params": []}
    scaffold = dict(templates.files(meta))
    assert set(scaffold) == {"algorithm.yml", "run.sh"}, qsm_ci.__version__
    import yaml

    keys = set(yaml.safe_load(scaffold["algorithm.yml"]))
    assert keys <= set(yaml.safe_load((SUBMISSION / "algorithm.yml").read_text()))
    run_sh = (SUBMISSION / "run.sh").read_text()
    # the scaffold's contract lines: arguments (input, output folder) with the container defaults
    head = [line for line in scaffold["run.sh"].splitlines()[1:6] if "bids_qsmnet" not in line]
    for line in head:
        assert line.split("(")[0].strip() in run_sh, line
    assert 'IN="${1:-/input}"; OUT="${2:-/output}"' in run_sh
    assert "-m bids_qsmnet.cli.qsmci" in run_sh
    assert os.access(SUBMISSION / "run.sh", os.X_OK)


def test_dockerfile_builds_on_the_app_image():
    from dockerfile_parse import DockerfileParser

    from bids_qsmnet.__about__ import __version__

    df = DockerfileParser(str(SUBMISSION / "Dockerfile"))
    args = [i["value"] for i in df.structure if i["instruction"] == "ARG"]
    assert args == [f"BASE=bids_qsmnet:{__version__}-cpu"]
    assert df.baseimage == f"bids_qsmnet:{__version__}-cpu"  # ARG BASE substituted
    assert f"-t bids_qsmnet:{__version__}-cpu ." in (ROOT / "Dockerfile").read_text()
    # QSM-CI starts `bash /algo/run.sh`: the app's entrypoint must be cleared
    entry = [i["value"] for i in df.structure if i["instruction"] == "ENTRYPOINT"]
    assert entry == ["[]"]
    image = re.search(r"^image: (\S+)$", (SUBMISSION / "algorithm.yml").read_text(), re.M)[1]
    assert f"docker build -t {image} qsm-ci/bids-qsmnet" in (SUBMISSION / "Dockerfile").read_text()
    hadolint = Path(sys.executable).with_name("hadolint")
    hadolint = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    if hadolint:
        res = subprocess.run([hadolint, "--no-color", str(SUBMISSION / "Dockerfile")],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


# --------------------------------------------------------------------------- the real tool


def _qsm_ci(args, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("qsm-ci")
    exe = str(exe) if exe.exists() else shutil.which("qsm-ci")
    if exe is None:
        pytest.skip("qsm-ci not installed (the test extra)")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([exe, "run", str(SUBMISSION), "--runner", "local", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def _metrics(stdout: str) -> dict:
    """The metric table ``qsm-ci run --truth`` prints (name, value)."""
    table = stdout.split("─" * 34, 1)[1]
    return {m[1]: float(m[2]) for m in re.finditer(r"^\s+(\w+)\s+(-?[\d.]+)$", table, re.M)}


@pytest.mark.slow
@pytest.mark.parametrize("tilt_deg", [0.0, 25.0])
def test_qsm_ci_tool_scores_bids_qsmnet_above_tkd(tmp_path, tilt_deg):
    from qsm_ci.qsm_eval import score_arrays

    ph = make_brain_phantom((96, 96, 96), rng=3)
    case = _case(tmp_path / "in", ph.chi, ph.mask, tilt_deg=tilt_deg)
    files = ["--localfield", "in/localfield.nii.gz", "--mask", "in/mask.nii.gz",
             "--params", "in/params.json"]
    run = _qsm_ci([*files, "-o", "chimap.nii.gz"], tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "not scored" in run.stdout
    img = nib.load(tmp_path / "chimap.nii.gz")
    assert img.shape == ph.chi.shape and np.allclose(img.affine, case["affine"])

    scored = _qsm_ci([*files, "-o", "scored.nii.gz", "--truth", "in/truth.nii.gz"], tmp_path)
    assert scored.returncode == 0, scored.stdout + scored.stderr
    net = _metrics(scored.stdout)
    seconds = float(re.search(r"✓ wrote .*\(([\d.]+)s\)", scored.stdout)[1])
    chi_tkd = tkd(case["field"], ph.mask, b0_dir=case["b0_dir"])
    ref, _ = score_arrays(chi_tkd, ph.chi, ph.mask.astype(float), "chi")
    print(f"\nQSM-CI dipole, 96³ brain phantom, SNR {SNR:g}, B0 tilted {tilt_deg:g}°: "
          f"bids_qsmnet NRMSE {net['nrmse']:.1f} % XSIM {net['xsim']:.3f} HFEN {net['hfen']:.1f} "
          f"({seconds:.1f} s); TKD NRMSE {ref['nrmse']:.1f} % XSIM {ref['xsim']:.3f} "
          f"HFEN {ref['hfen']:.1f}")
    # the tool's score is the scorer's score of the map it wrote
    own, _ = score_arrays(nib.load(tmp_path / "scored.nii.gz").get_fdata(), ph.chi,
                          ph.mask.astype(float), "chi")
    assert net["nrmse"] == pytest.approx(own["nrmse"], abs=1e-3)
    assert net["coverage"] == pytest.approx(1.0)
    assert net["nrmse"] < ref["nrmse"] - 5 and net["hfen"] < ref["hfen"]
    assert net["xsim"] > ref["xsim"] and net["correlation"] > ref["correlation"]
