"""Raw multi-echo GRE → local field → χ, end to end on simulated data with a known truth.

A phantom brain (known χ) sits in a simulated head (skull, scalp, air sinus: a background
field of tens of Hz inside the brain), scanned with a 3-echo GRE at 3 T with complex noise;
the phase is stored as Siemens integers and wraps several times.  ``init_phase_wf`` runs as a
real Nipype workflow; its outputs are compared with the simulation's truth.

Bounds (the values measured on this seed are in the comments):

* the brain mask found in the magnitude overlaps the true brain (Dice); it includes the CSF
  between brain and skull, as BET does;
* the local field equals V-SHARP applied to the *true* local field on the same mask (the
  chain adds little to what V-SHARP itself loses: unwrapping, echo fit, noise, background);
* the background (several times the local field after the first-order shim) is gone;
* χ from the chain's local field is close to χ from the true local field with the same network.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from _bidsapp_fixtures import write_nifti

from bids_qsmnet.data.megre import simulate_megre
from bids_qsmnet.data.synthetic import make_brain_phantom
from bids_qsmnet.metrics.scores import nrmse
from bids_qsmnet.phase.background import vsharp
from bids_qsmnet.physics.units import hz_to_ppm
from bids_qsmnet.workflows.phase import init_phase_wf

VS = (1.0, 1.0, 1.0)
SHAPE = (104, 120, 96)
TES = (0.004, 0.012, 0.020)
B0 = 3.0


def _rel(a, b, m):
    """RMS of (a − b) over m relative to the RMS of b, both demeaned over m."""
    d = a[m] - b[m]
    d = d - d.mean()
    bb = b[m] - b[m].mean()
    return float(np.sqrt(np.mean(d**2) / np.mean(bb**2)))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    rng = np.random.default_rng(20261125)
    ph = make_brain_phantom(SHAPE, VS, rng=rng)
    sim = simulate_megre(ph.chi, ph.mask, voxel_size=VS, b0_tesla=B0, echo_times=TES,
                         snr=50.0, rng=rng, integer_phase=True)
    d = tmp_path_factory.mktemp("raw")
    affine = np.diag([*VS, 1.0])
    phase_files, mag_files = [], []
    for n in range(len(TES)):
        phase_files.append(write_nifti(d / f"echo-{n + 1}_part-phase.nii.gz", sim.phase[n],
                                       affine, dtype=np.int16))
        mag_files.append(write_nifti(d / f"echo-{n + 1}_part-mag.nii.gz", sim.magnitude[n],
                                     affine))
    wf = init_phase_wf(echo_times=TES, b0_strength=B0)
    wf.base_dir = str(d / "work")
    wf.inputs.inputnode.phase_files = phase_files
    wf.inputs.inputnode.magnitude_files = mag_files
    wf.inputs.inputnode.mask_file = None
    wf.inputs.inputnode.b0_dir = None
    res = wf.run()
    out = {n.name: n.result.outputs for n in res.nodes()}  # identity nodes are not run

    def load(path):
        return np.asarray(nib.load(path).dataobj, dtype=np.float64)

    return {"ph": ph, "sim": sim, "total_hz": load(out["total_field"].out_file),
            "local": load(out["local_field"].out_file),
            "mask": load(out["local_field"].out_mask) > 0,
            "brain": load(out["brain_mask"].out_mask) > 0}


def test_phase_really_wraps_and_background_is_strong(chain):
    sim, m = chain["sim"], chain["ph"].mask
    # the last echo's phase spans many cycles in the brain before unwrapping
    span = 2 * np.pi * np.ptp(sim.total_field_hz[m]) * TES[-1]
    assert span > 4 * np.pi
    bg, loc = sim.background_field_ppm[m], sim.local_field_ppm[m]
    assert np.std(bg) > 3 * np.std(loc)


def test_brain_mask_from_magnitude(chain):
    brain, truth = chain["brain"], chain["ph"].mask
    dice = 2 * np.sum(brain & truth) / (brain.sum() + truth.sum())
    assert dice > 0.83  # measured 0.869 (the mask includes the 3 mm CSF layer under the skull)
    assert np.mean(truth[brain]) > 0.7  # measured 0.77: what the mask holds is mostly brain
    assert np.mean(brain[truth]) > 0.97  # measured 1.0: and no brain is lost


def test_total_field_in_hz(chain):
    # Laplacian unwrapping returns the field up to a harmonic function; its Laplacian agrees
    sim, m = chain["sim"], chain["mask"]
    from scipy import ndimage

    inner = ndimage.binary_erosion(m, iterations=2)
    lap_fit = ndimage.laplace(chain["total_hz"])[inner]
    lap_true = ndimage.laplace(sim.total_field_hz.astype(np.float64))[inner]
    err = np.sqrt(np.mean((lap_fit - lap_true) ** 2) / np.mean(lap_true**2))
    assert err < 0.5  # measured 0.40: noise of the 3-echo fit at SNR 50


def test_local_field_against_truth(chain):
    sim, local, m = chain["sim"], chain["local"], chain["mask"]
    truth_mask = chain["ph"].mask
    ev = m & truth_mask
    # V-SHARP of the noise-free, exactly known local field on the same mask: what V-SHARP
    # itself keeps of the local field
    ref = vsharp(sim.local_field_ppm.astype(np.float64), chain["brain"], VS)
    ev = ev & ref.mask
    assert _rel(local, ref.local_field.astype(np.float64), ev) < 0.6  # measured 0.48
    from scipy import ndimage

    deep = ndimage.binary_erosion(ev, iterations=6)  # ≥ 6 mm from the edge
    assert _rel(local, ref.local_field.astype(np.float64), deep) < 0.45  # measured 0.34
    # the background (sinus, skull, air) is removed: without removal the error would be
    # many times the local field
    total_ppm = hz_to_ppm(chain["total_hz"], B0)
    assert _rel(total_ppm, sim.local_field_ppm.astype(np.float64), ev) > 3  # measured 5.3
    assert np.all(local[~m] == 0)


def test_chi_from_the_chain_close_to_chi_from_the_true_field(chain):
    from bids_qsmnet.inference.predict import predict_chi
    from bids_qsmnet.models.modelfile import load_model, resolve_model

    ph, m = chain["ph"], chain["mask"]
    ev = m & ph.mask
    loaded = load_model(resolve_model(None))  # 1 mm axial: the simulation's frame
    chi_chain = predict_chi(loaded, chain["local"], m)
    chi_true = predict_chi(loaded, np.where(m, chain["sim"].local_field_ppm, 0), m)
    e_chain = nrmse(chi_chain, ph.chi, ev, demean=True)
    e_true = nrmse(chi_true, ph.chi, ev, demean=True)
    # Regression pins for the shipped default model, network alone (no refinement), on this
    # seed's 104×120×96 phantom at SNR 50: NRMSE 26.8 % from the chain's local field (magnitude
    # mask eroded by MASK_ERODE_MM) and 21.3 % from the true local field, measured by this test
    # on a 2-core x86_64 CPU (torch 2.13.0); each bound is the measured figure + 2 points
    # (platform rounding, not a worse model)
    assert e_true < 21.3 + 2.0, e_true
    assert e_chain < 26.8 + 2.0, e_chain
    assert e_chain < e_true + 5.5 + 2.0, (e_chain, e_true)  # what the chain costs: 5.5 points
