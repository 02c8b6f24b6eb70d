"""The benchmark records in docs/ describe the model file that ships.

``docs/accuracy.json`` (written by ``benchmarks/accuracy.py``) records the sha256 of the model
it evaluated; ``docs/benchmarks.json`` (``benchmarks/speed.py``) records, in the rows that ran
the shipped file, ``"model": "sha256 <first 12 hex digits>…"``.  Every sha recorded there must
be the shipped file's, so that regenerating the model without regenerating the figures fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bids_qsmnet.models.modelfile import file_sha256, resolve_model

DOCS = Path(__file__).resolve().parents[1] / "docs"
SHA_NOTE = re.compile(r"sha256 ([0-9a-f]{12,64})")


@pytest.fixture(scope="module")
def shipped_sha256() -> str:
    return file_sha256(resolve_model(None))


def _recorded(obj, where=""):
    """(place, hex digest) of every sha256 of a model recorded in a JSON record: keys named
    ``model_sha256`` and ``"model": "sha256 …"`` notes, at any depth."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            here = f"{where}.{key}"
            if key == "model_sha256" and value is not None:
                yield here, value
            elif key == "model" and isinstance(value, str) and SHA_NOTE.search(value):
                yield here, SHA_NOTE.search(value)[1]
            else:
                yield from _recorded(value, here)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _recorded(value, f"{where}[{i}]")


def test_accuracy_record_is_of_the_shipped_model(shipped_sha256):
    record = json.loads((DOCS / "accuracy.json").read_text())
    assert record["model_sha256"] == shipped_sha256
    for place, sha in _recorded(record):
        assert sha == shipped_sha256, place


def test_benchmark_records_name_only_the_shipped_model(shipped_sha256):
    record = json.loads((DOCS / "benchmarks.json").read_text())
    for place, sha in _recorded(record):
        assert shipped_sha256.startswith(sha), place
    # a "model" note that names no sha would escape the check above
    for i, row in enumerate(record["rows"]):
        if "model" in row:
            assert SHA_NOTE.search(row["model"]), (i, row["model"])


def test_the_accuracy_markdown_names_the_recorded_model(shipped_sha256):
    assert f"sha256 `{shipped_sha256[:16]}…`" in (DOCS / "accuracy.md").read_text()


def test_card_and_readme_quote_the_accuracy_record(tmp_path):
    """The accuracy blocks of MODEL_CARD.md and README.md are what ``benchmarks/card.py``
    writes from docs/accuracy.json: no figure there is edited by hand or left stale."""
    import importlib.util
    import shutil

    root = DOCS.parent
    spec = importlib.util.spec_from_file_location("card", root / "benchmarks" / "card.py")
    card = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(card)
    for name in ("MODEL_CARD.md", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    assert card.main(["--accuracy", str(DOCS / "accuracy.json"),
                      "--card", str(tmp_path / "MODEL_CARD.md"),
                      "--readme", str(tmp_path / "README.md")]) == 0
    for name in ("MODEL_CARD.md", "README.md"):
        assert (tmp_path / name).read_text() == (root / name).read_text(), name


def test_card_states_the_shipped_rule():
    """The model card's inference section quotes the λ rule's constants of the shipped file."""
    from bids_qsmnet.models.modelfile import read_model_spec

    auto = read_model_spec(resolve_model(None)).inference["dc_auto"]
    text = (DOCS.parent / "MODEL_CARD.md").read_text()
    rule = (f"λ = {auto['lambda_ref']:g}·(e/{auto['e_ref']:g})^{auto['power']:.2g}")
    assert rule in text, rule
    assert f"− {auto['floor']:g}²" in text
