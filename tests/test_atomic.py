"""Atomic writes (bids_qsmnet.io.atomic) and the removal of killed runs' temporaries."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bids_qsmnet.io.atomic import (
    TMP_PATTERN,
    atomic_output,
    remove_stale_temporaries,
    tmp_sibling,
    write_json_atomic,
    write_text_atomic,
)
from bids_qsmnet.io.locks import remove_held_temporaries as _remove_stale_temporaries


def test_tmp_sibling_is_hidden_in_the_same_folder_and_keeps_extensions(tmp_path):
    pid = os.getpid()
    assert tmp_sibling(tmp_path / "a.json") == str(tmp_path / f".a.json.tmp{pid}")
    assert tmp_sibling(tmp_path / "x_Chimap.nii.gz", keep_extension=True) == str(
        tmp_path / f".x_Chimap.tmp{pid}.nii.gz")
    assert tmp_sibling(tmp_path / "fig.png", keep_extension=True) == str(
        tmp_path / f".fig.tmp{pid}.png")
    for name in (tmp_sibling("a.json"), tmp_sibling("x.nii.gz", keep_extension=True),
                 tmp_sibling("model.safetensors")):
        assert TMP_PATTERN.match(os.path.basename(name)), name


@pytest.mark.parametrize("name", ["a.json", ".hidden", "x.tmp", ".x.tmp", ".x.tmpfile",
                                  "sub-01_Chimap.nii.gz", ".bids_qsmnet.lock", "x.tmp123"])
def test_ordinary_names_are_not_temporaries(name):
    assert not TMP_PATTERN.match(name)


def test_atomic_output_renames_on_success(tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with atomic_output(dest) as tmp:
        Path(tmp).write_text("new")
        assert dest.read_text() == "old"  # invisible until the block ends
    assert dest.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_output_keeps_the_old_file_when_the_writer_fails(tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_output(dest) as tmp:
            Path(tmp).write_text("half")
            raise ZeroDivisionError("writer failed")
    assert dest.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_text_and_json_writers(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "χ ppm\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "χ ppm\n"
    write_json_atomic(tmp_path / "b.json", {"b": 1, "a": Path("/x")})
    text = (tmp_path / "b.json").read_text()
    assert json.loads(text) == {"a": "/x", "b": 1}
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n")


def _plant(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half")
    return path


def test_remove_stale_temporaries_removes_only_temporaries(tmp_path):
    stale = [_plant(tmp_path / ".a.json.tmp12"),
             _plant(tmp_path / "sub-01" / "anat" / ".sub-01_Chimap.tmp345.nii.gz")]
    kept = [_plant(tmp_path / "a.json"), _plant(tmp_path / ".bids_qsmnet.lock"),
            _plant(tmp_path / "sub-01" / "anat" / "sub-01_Chimap.nii.gz")]
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(map(str, stale))
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_participant_run_cleans_only_the_folders_it_holds(tmp_path):
    """A run restricted to sub-02 removes sub-02's temporaries and report temporary, and
    leaves sub-01's and the shared top-level files' to the runs that may be writing them."""
    out = tmp_path / "out"
    mine = [_plant(out / "sub-02" / "anat" / ".sub-02_Chimap.nii.gz.tmp2319"),
            _plant(out / ".sub-02.html.tmp77")]
    others = [_plant(out / "sub-01" / "anat" / ".sub-01_Chimap.nii.gz.tmp88"),
              _plant(out / ".dataset_description.json.tmp99"),
              _plant(out / ".sub-01.html.tmp5")]
    _remove_stale_temporaries(out, ["02"])
    assert not any(p.exists() for p in mine)
    assert all(p.exists() for p in others)
    # a run of every subject holds the whole folder
    _plant(out / "logs" / ".CITATION.md.tmp4")
    _plant(out / "models" / "m" / ".model.safetensors.tmp4")
    work = _plant(out / "work" / ".x.tmp1")  # a work folder inside: not the app's to clean
    _remove_stale_temporaries(out)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == [str(work.relative_to(out))]
