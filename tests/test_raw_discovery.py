"""Discovery of raw (multi-)echo GRE runs and their per-run settings.

A run with no local field but raw phase echoes is processed from the echoes; each phase echo is
paired with the magnitude of the same echo, echo times come from each echo's sidecar.
"""

from __future__ import annotations

import os

import pytest
from _bidsapp_fixtures import add_volume, make_dataset, write_json

from bids_qsmnet.bids.discovery import DiscoveryError, build_layout, collect_runs
from bids_qsmnet.bids.settings import SettingsError, run_settings

TES = (0.004, 0.012, 0.020)


def _megre(root, sub="01", tes=TES, *, mag=True, extra="", field_strength=3.0, top=True):
    """Write a MEGRE series; MagneticFieldStrength in a top-level sidecar (inheritance)."""
    if top and field_strength is not None:
        write_json(root / "MEGRE.json", {"MagneticFieldStrength": field_strength})
    for n, te in enumerate(tes, start=1):
        side = {} if te is None else {"EchoTime": te}
        add_volume(root, f"sub-{sub}/anat/sub-{sub}{extra}_echo-{n}_part-phase_MEGRE.nii.gz",
                   side)
        if mag:
            add_volume(root, f"sub-{sub}/anat/sub-{sub}{extra}_echo-{n}_part-mag_MEGRE.nii.gz",
                       side)


@pytest.fixture
def raw(tmp_path):
    return make_dataset(tmp_path / "raw", derivative=False)


def test_echoes_paired_and_ordered(raw):
    # echoes written out of order on disk still come back in echo order, paired by echo index
    _megre(raw, tes=TES)
    run, = collect_runs(build_layout(raw), "01")
    assert run.is_raw and run.key == "sub-01"
    assert [os.path.basename(e.phase) for e in run.echoes] == [
        f"sub-01_echo-{n}_part-phase_MEGRE.nii.gz" for n in (1, 2, 3)]
    assert [os.path.basename(e.magnitude) for e in run.echoes] == [
        f"sub-01_echo-{n}_part-mag_MEGRE.nii.gz" for n in (1, 2, 3)]
    assert [e.echo_time for e in run.echoes] == list(TES)
    assert run.field == run.echoes[0].phase
    assert "echo" not in run.entities and "part" not in run.entities
    s = run_settings(run)
    assert s["echo_times"] == list(TES) and s["b0_strength"] == 3.0 and s["weighted"]
    assert s["units"] == "rad"


def test_local_field_wins_over_raw_phase_of_the_same_run(raw):
    _megre(raw, tes=TES)
    _megre(raw, tes=TES, extra="_acq-b")
    deriv = make_dataset(raw / "derivatives" / "sepia", derivative=True)
    add_volume(deriv, "sub-01/anat/sub-01_localfield.nii.gz", {"Units": "ppm"})
    runs = collect_runs(build_layout(raw), "01")
    assert [(r.key, r.is_raw) for r in runs] == [("sub-01", False), ("sub-01_acq-b", True)]


def test_own_output_folder_is_not_an_input(raw):
    """A raw-phase run's desc-localfield output must not be rediscovered as its input."""
    _megre(raw, tes=TES)
    out = make_dataset(raw / "derivatives" / "bids_qsmnet", derivative=True)
    add_volume(out, "sub-01/anat/sub-01_desc-localfield_fieldmap.nii.gz", {"Units": "ppm"})
    assert not collect_runs(build_layout(raw), "01")[0].is_raw
    run, = collect_runs(build_layout(raw, exclude=[out]), "01")
    assert run.is_raw


def test_single_echo_t2starw_phase(raw):
    write_json(raw / "T2starw.json", {"MagneticFieldStrength": 7.0})
    add_volume(raw, "sub-01/anat/sub-01_part-phase_T2starw.nii.gz", {"EchoTime": 0.02})
    add_volume(raw, "sub-01/anat/sub-01_part-mag_T2starw.nii.gz", {"EchoTime": 0.02})
    run, = collect_runs(build_layout(raw), "01")
    assert len(run.echoes) == 1 and run.echoes[0].magnitude.endswith("part-mag_T2starw.nii.gz")
    assert run_settings(run)["echo_times"] == [0.02]


def test_duplicate_echo_numbers_refused(raw):
    _megre(raw, tes=TES)
    add_volume(raw, "sub-01/anat/sub-01_rec-x_echo-1_part-phase_MEGRE.nii.gz",
               {"EchoTime": 0.004})
    with pytest.raises(DiscoveryError, match="do not form one echo series"):
        collect_runs(build_layout(raw), "01")


def test_nothing_found_names_both_queries(raw):
    add_volume(raw, "sub-01/anat/sub-01_T1w.nii.gz", {})
    with pytest.raises(DiscoveryError, match=r"looked for .*localfield.*raw GRE phase.*MEGRE"):
        collect_runs(build_layout(raw), "01")


@pytest.mark.parametrize("tes, message", [
    ((0.004, None, 0.02), "has no 'EchoTime'"),
    ((4.0, 12.0, 20.0), "not in seconds"),
    ((0.012, 0.004, 0.02), "do not increase"),
    ((0.004, [0.01, 0.02], 0.03), "must be one number"),
])
def test_bad_echo_times(raw, tes, message):
    _megre(raw, tes=tes)
    run, = collect_runs(build_layout(raw), "01")
    with pytest.raises(SettingsError, match=message):
        run_settings(run)


def test_field_strength_needed_or_given(raw):
    _megre(raw, tes=TES, field_strength=None)
    run, = collect_runs(build_layout(raw), "01")
    with pytest.raises(SettingsError, match="MagneticFieldStrength"):
        run_settings(run)
    assert run_settings(run, b0_strength=7.0)["b0_strength"] == 7.0


@pytest.mark.parametrize("value", [True, "3T", [3.0], 300.0, 0])
def test_field_strength_must_be_one_number_in_tesla(raw, value):
    """``true`` is not 1 T, and neither a string nor a list is a field strength."""
    _megre(raw, tes=TES, field_strength=value)
    run, = collect_runs(build_layout(raw), "01")
    with pytest.raises(SettingsError, match="MagneticFieldStrength"):
        run_settings(run)


def test_without_magnitude_a_mask_is_needed(raw):
    _megre(raw, tes=TES, mag=False)
    run, = collect_runs(build_layout(raw), "01")
    assert all(e.magnitude is None for e in run.echoes)
    with pytest.raises(SettingsError, match="no magnitude image .* and no brain mask"):
        run_settings(run)
    add_volume(raw, "derivatives/masks/sub-01/anat/sub-01_desc-brain_mask.nii.gz", {})
    make_dataset(raw / "derivatives" / "masks", derivative=True)
    run, = collect_runs(build_layout(raw), "01")
    assert run.mask is not None and not run_settings(run)["weighted"]
