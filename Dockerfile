# bids_qsmnet BIDS-App image.
#
#   docker build -t bids_qsmnet:0.1.0-cpu .                                # CPU (default)
#   docker build -t bids_qsmnet:0.1.0-cuda --build-arg VARIANT=cuda .      # NVIDIA GPUs
#
#   docker run --rm -v /data/bids:/bids:ro -v /data/out:/out -v /data/work:/work \
#       bids_qsmnet:0.1.0-cpu /bids /out participant -w /work
#   docker run --rm --gpus all ... bids_qsmnet:0.1.0-cuda /bids /out participant -w /work
#
# Mount points (created in the image, documented in README "Containers and clusters"):
#   /bids  the input BIDS dataset, mounted read-only (:ro)
#   /out   the output (BIDS-Derivatives) folder
#   /work  Nipype's working folder (-w /work): mount it to keep intermediate results, so that
#          a rerun after a crash reuses the finished nodes
#
# VARIANT selects the torch build (installed first, as README "Quick start" does, so that
# `pip install .` keeps it):
#   cpu   torch==2.13.0 from https://download.pytorch.org/whl/cpu (no CUDA libraries; small)
#   cuda  torch==2.13.0 from https://download.pytorch.org/whl/${TORCH_CUDA}; the default cu130
#         (CUDA 13.0) is the build PyPI ships for torch 2.13.0 on Linux and needs an NVIDIA
#         driver >= 580 on the host.  For older drivers pick another CUDA build that
#         pytorch.org lists for 2.13.0, e.g. --build-arg TORCH_CUDA=cu128 (CUDA 12.8).
#         The CUDA runtime comes inside the wheels; the driver comes from the host
#         (docker run --gpus all, NVIDIA Container Toolkit).
#
# Sites with their own mirrors, or behind a TLS-intercepting proxy (docs/containers.md):
#   BASE_IMAGE        any Debian/Ubuntu image with `python3` (>= 3.10) and its `venv` module,
#                     e.g. a mirror's copy of python:3.12.8-slim-bookworm, or a Debian base
#                     with python3-venv (benchmarks/container.py makes one with debootstrap)
#   TORCH_INDEX_URL   a mirror of the pytorch.org index for VARIANT (torch and its dependencies)
#   PIP_INDEX_URL     a PyPI mirror for everything else (PIP_TRUSTED_HOST for plain http)
#   secret ca_bundle  a PEM bundle that pip and apt trust instead of their defaults:
#                     docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt
#                     (a secret, not a build argument: it stays out of the image and its history;
#                     RUN --mount needs BuildKit, Docker's default builder since 23, or Podman)

ARG BASE_IMAGE=python:3.12.8-slim-bookworm

# ------------------------------------------------------------------------------ builder
FROM ${BASE_IMAGE} AS builder

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130
# empty: the defaults (pytorch.org for torch, below; PyPI for pip)
ARG TORCH_INDEX_URL=""
ARG PIP_INDEX_URL=""
ARG PIP_TRUSTED_HOST=""

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# compilers only here, for a dependency without a binary wheel on this platform (e.g. arm64);
# Debian's python3 keeps its C headers in python3-dev (python: images ship them), whose
# version must be the installed python3's: apt chooses it, so it is not pinned here
# hadolint ignore=DL3008
RUN --mount=type=secret,id=ca_bundle \
    ca=/run/secrets/ca_bundle; apt_opts=(); \
    if [ -s "$ca" ]; then apt_opts=(-o "Acquire::https::CAInfo=$ca"); fi; \
    headers="$(python3 -c 'import sysconfig; print(sysconfig.get_path("include"))')"; \
    dev=(); if [ ! -e "$headers/Python.h" ]; then dev=(python3-dev); fi; \
    apt-get "${apt_opts[@]}" update \
    && apt-get "${apt_opts[@]}" install -y --no-install-recommends build-essential=12.9 \
        "${dev[@]}" \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH

# torch first: the build chosen by VARIANT (pip then keeps it, it satisfies torch>=2.2);
# --no-compile: byte code comes from a run, in the last step of this stage
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    [ -n "${PIP_INDEX_URL}" ] || unset PIP_INDEX_URL; \
    [ -n "${PIP_TRUSTED_HOST}" ] || unset PIP_TRUSTED_HOST; \
    case "${VARIANT}" in \
        cpu) index="https://download.pytorch.org/whl/cpu" ;; \
        cuda) index="https://download.pytorch.org/whl/${TORCH_CUDA}" ;; \
        *) echo "VARIANT must be cpu or cuda, got '${VARIANT}'" >&2; exit 1 ;; \
    esac; \
    index="${TORCH_INDEX_URL:-$index}"; \
    python3 -m venv /opt/venv \
    && pip install --no-compile pip==24.3.1 setuptools==75.6.0 wheel==0.45.1 \
    && pip install --no-compile "torch==${TORCH_VERSION}" --index-url "${index}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY bids_qsmnet ./bids_qsmnet
# the README's install command (without byte code, as above)
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi; \
    [ -n "${PIP_INDEX_URL}" ] || unset PIP_INDEX_URL; \
    [ -n "${PIP_TRUSTED_HOST}" ] || unset PIP_TRUSTED_HOST; \
    pip install --no-compile . \
    && pip check \
    && bids_qsmnet --version

# Only what runs goes on.  No pip or wheel (nothing is installed at run time); no test suites
# of the dependencies; no C++ headers, test programs or CMake files of torch (the app runs
# torch eagerly and builds no extension).  The CPU variant must hold no CUDA library (a torch
# from the wrong index would bring gigabytes).  Byte code only for what runs: one participant
# run of the example dataset (also a test of the installed app) compiles exactly the modules
# a run imports, in the main process and its workers; bids_qsmnet itself is compiled whole.
# The byte code is then rewritten as unchecked-hash .pyc: valid whatever time stamps COPY
# gives the sources (time-stamped .pyc would be stale in the final stage and recompiled in
# memory at every start, since its user may not write them).
RUN site="$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
    && pip uninstall -y -q wheel pip \
    && find "$site" -depth -type d -name tests -prune -exec rm -rf {} + \
    && rm -rf "$site/torch/include" "$site/torch/test" "$site/torch/share" \
    && find "$site/torch/bin" -type f ! -name torch_shm_manager -delete \
    && if [ "${VARIANT}" = cpu ]; then \
        python3 -c 'import sys, torch; sys.exit(torch.version.cuda is not None)' \
        || { echo "VARIANT=cpu but torch is a CUDA build: check TORCH_INDEX_URL" >&2; exit 1; }; \
        if find "$site" -maxdepth 1 -iname 'nvidia*' | grep -q .; then \
            echo "VARIANT=cpu but CUDA libraries (nvidia-*) were installed" >&2; exit 1; fi; \
    fi \
    && python3 -c "from bids_qsmnet.data.example import make_example_dataset as make; make('/tmp/ds')" \
    && bids_qsmnet /tmp/ds /tmp/out participant -w /tmp/work --device cpu \
    && rm -rf /tmp/ds /tmp/out /tmp/work \
    && find "$site" -name '*.cpython-*.pyc' \
        | sed -E 's#/__pycache__/([^/]+)\.cpython-[0-9]+\.pyc$#/\1.py#' \
        | python3 -m compileall -q -f --invalidation-mode unchecked-hash -i - \
    && python3 -m compileall -q -f --invalidation-mode unchecked-hash "$site/bids_qsmnet"

# ------------------------------------------------------------------------------ final
FROM ${BASE_IMAGE}

ARG BASE_IMAGE
ARG VARIANT=cpu
ARG SOURCE_URL=https://github.com/bids-apps/bids_qsmnet
ARG VCS_REF=unknown

LABEL org.opencontainers.image.title="bids_qsmnet" \
      org.opencontainers.image.description="BIDS-App: quantitative susceptibility maps (QSM, chi in ppm) from local field maps with the deep networks QSMnet and QSMnet+ (PyTorch, Nipype, pybids)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.github.bids_qsmnet.variant="${VARIANT}"

# a non-root user; HOME and the matplotlib config folder are writable by any uid, so
# `docker run --user "$(id -u):$(id -g)"` (outputs owned by the caller) works too
RUN groupadd --gid 1000 bidsapp \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/bidsapp \
        --shell /bin/bash bidsapp \
    && mkdir -p /home/bidsapp/.config/matplotlib /bids /out /work \
    && chown -R bidsapp:bidsapp /home/bidsapp /out /work \
    && chmod -R a+rwX /home/bidsapp \
    && chmod 1777 /out /work

COPY --from=builder /opt/venv /opt/venv

# BIDS_QSMNET_CONTAINER: recorded in dataset_description.json (GeneratedBy.Container);
# NIPYPE_NO_ET: no version check over the network (cluster nodes are offline);
# DEPLOY_BINS: the command Neurodesk's transparent-singularity wraps onto the host PATH
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/bidsapp \
    MPLCONFIGDIR=/home/bidsapp/.config/matplotlib \
    BIDS_QSMNET_CONTAINER=docker \
    NIPYPE_NO_ET=1 \
    DEPLOY_BINS=bids_qsmnet \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# numeric (uid:gid of bidsapp), so that "runAsNonRoot" checks can verify it
USER 1000:1000
WORKDIR /home/bidsapp

# build matplotlib's font cache once, as the runtime user, instead of at every start
RUN python3 -c "import matplotlib.pyplot" \
    && chmod -R a+rwX /home/bidsapp/.config \
    && bids_qsmnet --version

# No HEALTHCHECK: a batch command, not a service, and the bases define none to disable
# (HEALTHCHECK NONE makes podman look for systemd on every run, and warn where it is absent).

ENTRYPOINT ["bids_qsmnet"]
CMD ["--help"]
