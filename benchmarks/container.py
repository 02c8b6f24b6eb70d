"""Build the bids_qsmnet image with Podman, run it on the example dataset, and measure it.

Usage (as root: debootstrap and Podman's image store)::

    python benchmarks/container.py all               # base, build, runs; prints one JSON line
    python benchmarks/container.py all --record      # ... and records it in docs/benchmarks.*
    python benchmarks/container.py base              # only the Debian base image
    python benchmarks/container.py build --base localhost/bids_qsmnet-base:bookworm

What ``all`` does, one step after the other (``tests/test_container_image.py`` runs the same
steps and checks their results):

1. **Base image**: Debian ``--suite`` (bookworm, whose ``python3`` is 3.11) made with
   ``debootstrap --variant=minbase`` from the machine's own Debian mirror (the first
   ``/etc/apt`` source of that suite, or ``--mirror``), with ``python3-venv`` and
   ``ca-certificates``, imported with ``podman import``.  No registry is involved.  ``--base
   IMAGE`` skips this step (e.g. ``python:3.12.8-slim-bookworm``, the Dockerfile's default).
2. **Build** of the top-level ``Dockerfile`` (``podman build --format docker``, no layer cache,
   so the time is a whole build) with ``BASE_IMAGE`` set to that base.  The build reaches
   package indexes the way this machine's pip does: its ``index-url`` becomes
   ``PIP_INDEX_URL``, its CA bundle (``cert``) the build secret ``ca_bundle``.  Torch and its
   dependencies are fetched with this machine's pip into a small PEP 503 index that the build
   mounts read-only (``TORCH_INDEX_URL=file:///wheelhouse/simple``); where this machine's pip
   cannot find the CPU wheel, the build uses the Dockerfile's pytorch.org index.
3. **Runs**, all with ``--network none`` (nothing is fetched at run time): ``--version``; the
   example dataset's participant level as the image's user (uid 1000) on folders it owns, and
   as ``--user`` on folders of the caller (a uid the image does not know when the caller is
   root); a root-owned output folder as the image's user (one error line, exit 1); the
   Singularity recipe's path: the image saved with ``podman save --format docker-archive`` to
   the file the recipe's ``From:`` names, removed, loaded back from that archive, and run the
   way Apptainer runs a SIF
   (read-only root file system, the caller's uid, the recipe's ``%environment`` and
   ``%runscript``); and the same dataset natively with this interpreter.  The χ maps of every
   container run are compared with the native ones.

Podman settings that some machines need (a ``CONTAINERS_CONF`` file written for the session
unless one is set): the ``runc`` runtime where installed (``crun`` refuses hybrid cgroup
hierarchies), the ``cgroupfs`` manager without systemd, and ``nofile``/``nproc`` limits of at
most 32768 within this process's hard limits (on some hosts runc may not set Podman's
defaults: "error setting rlimits … operation not permitted").
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SINGULARITY = ROOT / "Singularity"
EXAMPLE = ROOT / "examples" / "ds-synthetic"
#: the image's own user (Dockerfile: USER 1000:1000)
IMAGE_UID = 1000
#: the caller's ids for the ``--user`` run when the caller is root (any uid the image lacks)
STAND_IN_UID = 4321
#: the χ maps of a container run equal the native run's within this (ppm)
CHI_TOLERANCE_PPM = 1e-5
#: what the CPU image may weigh (bytes, as podman counts: 1 MB = 10^6 bytes)
CPU_IMAGE_BUDGET = 1_200_000_000
#: limits that the containers get, within this process's hard limits and at most
#: :data:`_LIMIT_CAP` (runc may not raise them to the hard limit everywhere; see the docstring)
_LIMITS = {"nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC}
_LIMIT_CAP = 32768


class ContainerBenchError(RuntimeError):
    """A step failed; the message says which and ends with the command's last output."""


# ----------------------------------------------------------------------------- podman


def podman_conf(folder: Path) -> dict[str, str]:
    """Environment for podman calls: ``CONTAINERS_CONF`` pointing at a file written into
    ``folder`` (unless the caller set one)."""
    env = dict(os.environ)
    if env.get("CONTAINERS_CONF"):
        return env
    lines = ["[containers]"]
    limits = []
    for name, which in _LIMITS.items():
        _soft, hard = resource.getrlimit(which)
        value = _LIMIT_CAP if hard == resource.RLIM_INFINITY else min(hard, _LIMIT_CAP)
        limits.append(f'"{name}={value}:{value}"')
    if limits:
        lines.append(f"default_ulimits = [{', '.join(limits)}]")
    lines.append("[engine]")
    if shutil.which("runc"):
        lines.append('runtime = "runc"')
    if not Path("/run/systemd/system").is_dir():
        lines += ['cgroup_manager = "cgroupfs"', 'events_logger = "file"']
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "containers.conf"
    conf.write_text("\n".join(lines) + "\n")
    env["CONTAINERS_CONF"] = str(conf)
    return env


def _run(cmd: list[str], env: dict | None = None, *, timeout: float = 900,
         what: str | None = None, log: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """``cmd`` with its output captured (or written to ``log``); raise on failure."""
    if log is not None:
        with open(log, "w") as fh:
            res = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True,
                                 timeout=timeout, **kw)
        out = log.read_text()
    else:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                             **kw)
        out = res.stdout + res.stderr
    if res.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-25:])
        raise ContainerBenchError(f"{what or cmd[0]} failed (exit {res.returncode}): "
                                  f"{' '.join(cmd)}\n{tail}")
    return res


def podman_problem(env: dict) -> str | None:
    """Why podman cannot run containers here, or None when it can."""
    if shutil.which("podman") is None:
        return "podman is not installed (Debian: apt-get install podman buildah runc)"
    try:
        res = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
                             env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman info failed: {exc}"
    if res.returncode != 0:
        return f"podman info failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}"
    return None


def podman_version(env: dict) -> str:
    return _run(["podman", "--version"], env).stdout.strip().split()[-1]


# ----------------------------------------------------------------------------- base image


def debian_mirror(suite: str, sources_dir: Path = Path("/etc/apt")) -> str | None:
    """The first ``deb`` source of ``suite`` (component ``main``) in this machine's apt
    configuration: one-line ``.list`` files and deb822 ``.sources`` files."""
    files = [sources_dir / "sources.list", *sorted(sources_dir.glob("sources.list.d/*"))]
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.split()
                if (fields.get("enabled", ["yes"])[0] != "no" and "deb" in fields.get("types", [])
                        and suite in fields.get("suites", [])
                        and "main" in fields.get("components", [])):
                    return fields["uris"][0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 4 and words[0] == "deb" and words[2] == suite \
                        and "main" in words[3:]:
                    return words[1]
    return None


#: what a slim Debian image leaves out (dpkg path filters, as Docker's debian:*-slim)
_DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
"""


def make_base(tag: str, work: Path, env: dict, *, suite: str = "bookworm",
              mirror: str | None = None) -> dict:
    """A Debian ``suite`` image with ``python3-venv`` (debootstrap, then ``podman import``)."""
    if shutil.which("debootstrap") is None:
        raise ContainerBenchError("debootstrap is not installed (apt-get install debootstrap)")
    mirror = mirror or debian_mirror(suite)
    if mirror is None:
        raise ContainerBenchError(f"no apt source of {suite} (main) in /etc/apt: give --mirror")
    rootfs = work / "rootfs"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    t0 = time.perf_counter()
    _run(["debootstrap", "--variant=minbase", "--include=python3-venv,ca-certificates",
          suite, str(rootfs), mirror], env, timeout=1800, what="debootstrap",
         log=work / "debootstrap.log")
    # slim: no documentation, manual pages or translations, no package lists or caches
    (rootfs / "etc/dpkg/dpkg.cfg.d/slim").write_text(_DPKG_EXCLUDES)
    for pattern in ("usr/share/doc/*/*", "usr/share/man/*", "usr/share/info/*",
                    "usr/share/locale/*", "usr/share/lintian/*", "var/lib/apt/lists/*",
                    "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/log/*.log",
                    "var/log/apt/*"):
        for p in glob.glob(str(rootfs / pattern)):
            if p.endswith(("/copyright", "/locale.alias")):
                continue
            try:  # a path through a symlinked folder may be gone already
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
            except FileNotFoundError:
                pass
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                           stdout=subprocess.PIPE)
    try:
        _run(["podman", "import",
              "--change", "ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "--change", "ENV=LANG=C.UTF-8", "--change", 'CMD=["/bin/bash"]',
              "--message", f"debootstrap --variant=minbase {suite} {mirror}", "-", tag],
             env, stdin=tar.stdout, what="podman import")
    finally:
        tar.stdout.close()
        tar.wait()
    seconds = time.perf_counter() - t0
    shutil.rmtree(rootfs)
    return {"base": tag, "base_from": f"debootstrap {suite} ({mirror})",
            "base_s": round(seconds, 1), "base_mb": round(image_size(tag, env) / 1e6)}


def given_base(image: str, env: dict) -> dict:
    """The figures of a base image given by name (``--base``), pulled where missing."""
    if subprocess.run(["podman", "image", "exists", image], env=env).returncode != 0:
        _run(["podman", "pull", image], env, timeout=1800, what="podman pull")
    return {"base": image, "base_from": image, "base_s": None,
            "base_mb": round(image_size(image, env) / 1e6)}


def image_python(image: str, env: dict) -> str:
    """``X.Y`` of the image's ``python3``."""
    out = _run(["podman", "run", "--rm", "--network", "none", "--entrypoint", "python3", image,
                "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], env).stdout
    return out.strip()


def image_size(image: str, env: dict) -> int:
    return int(_run(["podman", "image", "inspect", "--format", "{{.Size}}", image],
                    env).stdout.strip())


# ----------------------------------------------------------------------------- package indexes


def host_pip_config() -> dict[str, str]:
    """This machine's pip settings (``pip config list`` and ``PIP_*`` variables), keyed by the
    option name (``index-url``, ``cert``, …); the environment wins, as for pip itself."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                         text=True).stdout
    scopes: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        m = re.match(r"^([^.=]*)\.([\w-]+)='(.*)'$", line.strip())
        if m:
            scopes.setdefault(m[1], {})[m[2]] = m[3]
    conf: dict[str, str] = {}
    for scope in ("global", "download", ":env:"):  # later ones win, as in pip
        conf.update(scopes.get(scope, {}))
    for key in ("index-url", "cert", "trusted-host"):
        value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if value:
            conf[key] = value
    return conf


def ca_bundle(conf: dict[str, str]) -> Path | None:
    """The CA bundle this machine's pip trusts, when it is not pip's own (certifi's)."""
    for value in (conf.get("cert"), os.environ.get("REQUESTS_CA_BUNDLE"),
                  os.environ.get("SSL_CERT_FILE")):
        if value and Path(value).is_file():
            return Path(value)
    return None


def torch_wheelhouse(dest: Path, torch_version: str, python: str) -> Path | None:
    """torch ``<version>+cpu`` and its dependencies for Python ``python`` as this machine's pip
    finds them, laid out as a PEP 503 index under ``dest/simple``; None when it finds none."""
    wheels = dest / "wheels"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", f"torch=={torch_version}+cpu",
         "--only-binary=:all:", "--python-version", python, "--dest", str(wheels)],
        capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        return None
    simple = dest / "simple"
    by_project: dict[str, list[str]] = {}
    for whl in sorted(wheels.glob("*.whl")):
        project = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
        by_project.setdefault(project, []).append(whl.name)
    for project, files in by_project.items():
        (simple / project).mkdir(parents=True, exist_ok=True)
        links = []
        for name in files:
            digest = hashlib.sha256((wheels / name).read_bytes()).hexdigest()
            links.append(f'<a href="../../wheels/{name}#sha256={digest}">{name}</a><br>')
        (simple / project / "index.html").write_text(
            "<!DOCTYPE html>\n<html><body>\n" + "\n".join(links) + "\n</body></html>\n")
    (simple / "index.html").write_text(
        "<!DOCTYPE html>\n<html><body>\n"
        + "\n".join(f'<a href="{p}/">{p}</a><br>' for p in sorted(by_project))
        + "\n</body></html>\n")
    return dest


# ----------------------------------------------------------------------------- build


def build_image(tag: str, base: str, work: Path, env: dict, *, variant: str = "cpu",
                torch_index_url: str | None = None, vcs_ref: str | None = None) -> dict:
    """``podman build`` of the Dockerfile on ``base``; returns the build's figures."""
    conf = host_pip_config()
    cmd = ["podman", "build", "--format", "docker", "--layers=false", "--pull=missing",
           "-f", str(DOCKERFILE), "-t", tag, "--build-arg", f"BASE_IMAGE={base}",
           "--build-arg", f"VARIANT={variant}"]
    index_note = "pytorch.org"
    if torch_index_url is None and variant == "cpu":
        torch_version = _dockerfile_arg("TORCH_VERSION")
        house = torch_wheelhouse(work / "wheelhouse", torch_version, image_python(base, env))
        if house is not None:
            cmd += ["--volume", f"{house}:/wheelhouse:ro"]
            torch_index_url = "file:///wheelhouse/simple"
            index_note = "this machine's pip (a local PEP 503 index)"
    if torch_index_url:
        cmd += ["--build-arg", f"TORCH_INDEX_URL={torch_index_url}"]
        if index_note == "pytorch.org":
            index_note = torch_index_url
    index = conf.get("index-url", "").split()
    if index and not index[0].startswith("file:"):  # a local folder is not in the build
        cmd += ["--build-arg", f"PIP_INDEX_URL={index[0]}"]
        if conf.get("trusted-host"):
            cmd += ["--build-arg", f"PIP_TRUSTED_HOST={conf['trusted-host']}"]
    ca = ca_bundle(conf)
    if ca is not None:
        cmd += ["--secret", f"id=ca_bundle,src={ca}"]
    if vcs_ref:
        cmd += ["--build-arg", f"VCS_REF={vcs_ref}"]
    cmd.append(str(ROOT))
    t0 = time.perf_counter()
    _run(cmd, env, timeout=3600, what="podman build", log=work / "build.log")
    seconds = time.perf_counter() - t0
    venv = _run(["podman", "run", "--rm", "--network", "none", "--entrypoint", "du", tag,
                 "-sb", "/opt/venv"], env).stdout.split()[0]
    return {"image": tag, "variant": variant, "build_s": round(seconds, 1),
            "image_mb": round(image_size(tag, env) / 1e6), "venv_mb": round(int(venv) / 1e6),
            "torch_index": index_note, "ca_bundle_secret": ca is not None}


def _dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    if not m:
        raise ContainerBenchError(f"Dockerfile has no ARG {name}=…")
    return m[1]


# ----------------------------------------------------------------------------- runs


def _owned_dirs(parent: Path, uid: int, gid: int, *names: str) -> list[Path]:
    """Fresh folders ``parent/<name>`` owned by ``uid:gid`` (as root: chown; otherwise inside
    podman's user namespace, where the container's uids live)."""
    out = []
    for name in names:
        d = parent / name
        d.mkdir(parents=True)
        out.append(d)
    if os.geteuid() == 0:
        for d in out:
            os.chown(d, uid, gid)
    elif uid != os.getuid():
        subprocess.run(["podman", "unshare", "chown", f"{uid}:{gid}", *map(str, out)],
                       check=True)
    return out


def _podman_run(image: str, args: list[str], env: dict, *, mounts=(), user: str | None = None,
                extra=(), timeout: float = 1800) -> tuple[subprocess.CompletedProcess, float]:
    cmd = ["podman", "run", "--rm", "--network", "none"]
    if user:
        cmd += ["--user", user]
        if os.geteuid() != 0:  # rootless: the caller's uid is itself inside, not a sub-uid
            cmd.append("--userns=keep-id")
    for src, dst in mounts:
        cmd += ["--volume", f"{src}:{dst}"]
    cmd += [*extra, image, *args]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return res, time.perf_counter() - t0


def remove_tree(folder: Path) -> None:
    """Remove ``folder``, also what containers of a rootless Podman wrote there (sub-uids)."""
    if os.geteuid() != 0 and shutil.which("podman"):
        subprocess.run(["podman", "unshare", "rm", "-rf", str(folder)], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def _checked(res: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-25:])
        raise ContainerBenchError(f"{what} failed (exit {res.returncode}):\n{tail}")
    return res


def chi_maps(out_dir: Path) -> dict[str, Path]:
    """The χ maps of an output folder, keyed by their path inside it."""
    return {str(p.relative_to(out_dir)): p for p in sorted(out_dir.rglob("*_Chimap.nii.gz"))}


def max_chi_difference(out_dir: Path, reference: Path) -> float:
    """Largest |χ − χ_ref| (ppm) over the maps of two output folders (the same maps)."""
    import nibabel as nib
    import numpy as np

    mine, ref = chi_maps(out_dir), chi_maps(reference)
    if not ref or sorted(mine) != sorted(ref):
        raise ContainerBenchError(f"χ maps differ: {sorted(mine)} against {sorted(ref)}")
    worst = 0.0
    for key, path in ref.items():
        a = np.asarray(nib.load(path).dataobj, dtype=np.float64)
        b = np.asarray(nib.load(mine[key]).dataobj, dtype=np.float64)
        if a.shape != b.shape:
            raise ContainerBenchError(f"{key}: shape {b.shape} against {a.shape}")
        worst = max(worst, float(np.max(np.abs(a - b))))
    return worst


def native_run(work: Path) -> tuple[Path, float]:
    """The example dataset's participant level with this interpreter's bids_qsmnet."""
    out = work / "native" / "out"
    cmd = [sys.executable, "-m", "bids_qsmnet", str(EXAMPLE), str(out), "participant", "-w",
           str(work / "native" / "work")]
    t0 = time.perf_counter()
    _run(cmd, timeout=1800, what="native run")
    return out, time.perf_counter() - t0


def singularity_sections(text: str) -> tuple[dict[str, str], dict[str, list[str]], dict]:
    """Header, section lines (as written, blank lines dropped) and ``%arguments`` defaults of
    an Apptainer definition file."""
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
            sections[current].append(line.rstrip())
    arguments = dict(line.strip().split("=", 1) for line in sections.get("arguments", [])
                     if "=" in line and not line.strip().startswith("#"))
    return header, sections, arguments


def render_template(text: str, values: dict[str, str]) -> str:
    """Apptainer's ``{{ NAME }}`` build-argument substitution."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: values[m[1]], text)


def run_like_apptainer(image: str, args: list[str], env: dict, *, uid: int, gid: int,
                       home: Path, mounts=(), timeout: float = 1800):
    """Run ``image`` the way ``apptainer run --cleanenv`` runs a SIF converted from it: the
    root file system read-only, the caller's uid, a home folder of the caller's, and the
    Singularity recipe's ``%environment`` then ``%runscript`` in ``/bin/sh`` (on top of the
    image's environment, which Apptainer converts too)."""
    _, sections, arguments = singularity_sections(SINGULARITY.read_text())
    script = "\n".join(["set -e", *sections["environment"], *sections["runscript"]])
    script = render_template(script, arguments)
    extra = ["--read-only", "--env", f"HOME={home}", "--entrypoint", "/bin/sh"]
    res, seconds = _podman_run(image, ["-c", script, "runscript", *args], env,
                               mounts=[(home, home), *mounts], user=f"{uid}:{gid}",
                               extra=extra, timeout=timeout)
    return res, seconds


def singularity_archive(image: str, folder: Path, env: dict, *, variant: str = "cpu") -> Path:
    """``podman save`` of ``image`` to the docker-archive that the Singularity recipe's
    ``From:`` names (in ``folder``)."""
    header, _, arguments = singularity_sections(SINGULARITY.read_text())
    if header.get("bootstrap") != "docker-archive":
        raise ContainerBenchError(f"Singularity bootstraps from {header.get('bootstrap')}, "
                                  "not the saved image (docker-archive)")
    name = render_template(header["from"], {**arguments, "VARIANT": variant})
    archive = folder / name
    _run(["podman", "save", "--format", "docker-archive", "-o", str(archive), image], env,
         what="podman save")
    return archive


def run_checks(image: str, work: Path, env: dict) -> dict:
    """Every run of step 3; returns their figures (seconds, max difference in ppm)."""
    from bids_qsmnet.__about__ import __version__

    version = _checked(_podman_run(image, ["--version"], env)[0], "--version").stdout.strip()
    if version != f"bids_qsmnet {__version__}":
        raise ContainerBenchError(f"--version printed {version!r}")
    bids = (EXAMPLE, "/bids:ro")
    runs: dict[str, dict] = {}
    native, native_s = native_run(work)
    runs["native"] = {"seconds": round(native_s, 1)}

    # the image's user on folders it owns
    out, wd = _owned_dirs(work / "image-user", IMAGE_UID, IMAGE_UID, "out", "work")
    res, seconds = _podman_run(image, ["/bids", "/out", "participant", "-w", "/work"], env,
                               mounts=[bids, (out, "/out"), (wd, "/work")])
    _checked(res, "participant run as the image's user")
    runs["image user"] = {"seconds": round(seconds, 1),
                          "max_abs_diff_ppm": max_chi_difference(out, native),
                          "stderr": res.stderr}

    # --user: the caller's ids on the caller's folders
    uid, gid = (os.getuid(), os.getgid()) if os.geteuid() else (STAND_IN_UID, STAND_IN_UID)
    out, wd = _owned_dirs(work / "caller", uid, gid, "out", "work")
    res, seconds = _podman_run(image, ["/bids", "/out", "participant", "-w", "/work"], env,
                               mounts=[bids, (out, "/out"), (wd, "/work")],
                               user=f"{uid}:{gid}")
    _checked(res, f"participant run with --user {uid}:{gid}")
    runs["--user"] = {"seconds": round(seconds, 1), "user": f"{uid}:{gid}",
                      "max_abs_diff_ppm": max_chi_difference(out, native),
                      "stderr": res.stderr}

    # an output folder the image's user cannot write
    locked = work / "locked-out"
    locked.mkdir()
    os.chmod(locked, 0o755)
    res, _ = _podman_run(image, ["/bids", "/out", "participant"], env,
                         mounts=[bids, (locked, "/out")])
    runs["unwritable output"] = {"exit": res.returncode, "stdout": res.stdout,
                                 "stderr": res.stderr, "left": sorted(os.listdir(locked))}

    # the Singularity recipe's image: saved, removed, loaded back from the archive, and run as
    # Apptainer runs a SIF
    archive = singularity_archive(image, work, env)
    built_id = _run(["podman", "image", "inspect", "--format", "{{.Id}}", image], env).stdout
    _run(["podman", "rmi", "--force", image], env, what="podman rmi")
    _run(["podman", "load", "-i", str(archive)], env, what="podman load")
    archive_mb = round(archive.stat().st_size / 1e6)
    archive.unlink()
    loaded_id = _run(["podman", "image", "inspect", "--format", "{{.Id}}", image], env).stdout
    if loaded_id != built_id:
        raise ContainerBenchError(f"the archive holds {loaded_id.strip()}, not the built "
                                  f"{built_id.strip()}")
    home, out, wd = _owned_dirs(work / "apptainer", uid, gid, "home", "out", "work")
    res, seconds = run_like_apptainer(image, ["/bids", "/out", "participant", "-w", "/work"],
                                      env, uid=uid, gid=gid, home=home,
                                      mounts=[bids, (out, "/out"), (wd, "/work")])
    _checked(res, "participant run from the Singularity recipe's archive")
    description = json.loads((out / "dataset_description.json").read_text())
    runs["apptainer-like"] = {"seconds": round(seconds, 1), "archive_mb": archive_mb,
                              "max_abs_diff_ppm": max_chi_difference(out, native),
                              "container": description["GeneratedBy"][0].get("Container"),
                              "stderr": res.stderr}
    return {"version": version, "runs": runs}


# ----------------------------------------------------------------------------- record


def benchmark_row(base: dict, build: dict, checks: dict, env: dict) -> dict:
    runs = checks["runs"]
    return {
        "bench": "container", **build, **{k: v for k, v in base.items() if k != "base"},
        "podman": podman_version(env),
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "runs_s": {k: v["seconds"] for k, v in runs.items() if "seconds" in v},
        "max_abs_diff_ppm": max(v["max_abs_diff_ppm"] for v in runs.values()
                                if "max_abs_diff_ppm" in v),
        "date": time.strftime("%Y-%m-%d"),
    }


def record(row: dict, json_path: Path, md_path: Path, notes: Path) -> None:
    """Replace the container rows of ``json_path`` with ``row`` and regenerate ``md_path``
    with ``benchmarks/speed.py``'s writer (which renders them in their own section)."""
    import importlib.util

    data = json.loads(json_path.read_text())
    data["rows"] = [r for r in data["rows"] if r["bench"] != "container"] + [row]
    json_path.write_text(json.dumps(data, indent=1))  # as benchmarks/speed.py writes it
    spec = importlib.util.spec_from_file_location("speed", Path(__file__).with_name("speed.py"))
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    data["meta"]["notes_file"] = str(notes)
    speed.write_markdown(data["meta"], data["rows"], str(md_path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=("base", "build", "all"))
    p.add_argument("--base", default=None,
                   help="base image for the build (default: make one with debootstrap)")
    p.add_argument("--suite", default="bookworm", help="Debian suite of the debootstrap base")
    p.add_argument("--mirror", default=None,
                   help="Debian mirror (default: this machine's apt source of --suite)")
    p.add_argument("--tag", default=None, help="image name (default: bids_qsmnet:<version>-cpu)")
    p.add_argument("--torch-index-url", default=None,
                   help="TORCH_INDEX_URL for the build (default: see the module docstring)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true",
                   help="all: keep the base and the image afterwards")
    p.add_argument("--record", action="store_true",
                   help="write the figures into --json and regenerate --md")
    p.add_argument("--json", default=str(ROOT / "docs" / "benchmarks.json"))
    p.add_argument("--md", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--notes", default=str(ROOT / "benchmarks" / "notes.md"))
    args = p.parse_args(argv)
    from bids_qsmnet.__about__ import __version__

    tag = args.tag or f"localhost/bids_qsmnet:{__version__}-cpu"
    base_tag = f"localhost/bids_qsmnet-base:{args.suite}"
    work = Path(tempfile.mkdtemp(prefix="bids_qsmnet_container_", dir=args.work))
    try:
        env = podman_conf(work / "conf")
        problem = podman_problem(env)
        if problem:
            print(f"container.py: {problem}", file=sys.stderr)
            return 1
        made = []
        try:
            if args.base is not None:
                base = given_base(args.base, env)
            else:
                base = make_base(base_tag, work, env, suite=args.suite, mirror=args.mirror)
                made.append(base_tag)
            if args.step == "base":
                print(json.dumps(base))
                return 0
            build = build_image(tag, base["base"], work, env,
                                torch_index_url=args.torch_index_url)
            made.append(tag)
            if args.step == "build":
                print(json.dumps({**base, **build}))
                return 0
            checks = run_checks(tag, work, env)
            row = benchmark_row(base, build, checks, env)
            print(json.dumps(row))
            if args.record:
                record(row, Path(args.json), Path(args.md), Path(args.notes))
        except ContainerBenchError as exc:
            print(f"container.py: {exc}", file=sys.stderr)
            return 1
        finally:
            if args.step == "all" and not args.keep:  # `base` and `build` make images to keep
                for image in reversed(made):
                    subprocess.run(["podman", "rmi", "--force", image], env=env,
                                   capture_output=True)
    finally:
        remove_tree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
