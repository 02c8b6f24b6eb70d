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

# ------------------------------------------------------------------------------ builder
FROM python:3.12.8-slim-bookworm AS builder

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# compilers only here, for a dependency without a binary wheel on this platform (e.g. arm64)
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential=12.9 \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv \
    && pip install pip==24.3.1 setuptools==75.6.0 wheel==0.45.1

# torch first: the build chosen by VARIANT (pip then keeps it, it satisfies torch>=2.2)
RUN case "${VARIANT}" in \
        cpu) index="https://download.pytorch.org/whl/cpu" ;; \
        cuda) index="https://download.pytorch.org/whl/${TORCH_CUDA}" ;; \
        *) echo "VARIANT must be cpu or cuda, got '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && pip install "torch==${TORCH_VERSION}" --index-url "${index}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY bids_qsmnet ./bids_qsmnet
# the README's install command, then a wheel of the same source for reuse in other images
RUN pip install . \
    && pip wheel --no-deps --wheel-dir /opt/bids_qsmnet/dist . \
    && bids_qsmnet --version

# ------------------------------------------------------------------------------ final
FROM python:3.12.8-slim-bookworm

ARG VARIANT=cpu
ARG SOURCE_URL=https://github.com/bids-apps/bids_qsmnet
ARG VCS_REF=unknown

LABEL org.opencontainers.image.title="bids_qsmnet" \
      org.opencontainers.image.description="BIDS-App: quantitative susceptibility maps (QSM, chi in ppm) from local field maps with the deep networks QSMnet and QSMnet+ (PyTorch, Nipype, pybids)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.12.8-slim-bookworm" \
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
COPY --from=builder /opt/bids_qsmnet/dist /opt/bids_qsmnet/dist

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
RUN python -c "import matplotlib.pyplot" \
    && chmod -R a+rwX /home/bidsapp/.config \
    && bids_qsmnet --version

# a batch command, not a service: nothing to probe
HEALTHCHECK NONE

ENTRYPOINT ["bids_qsmnet"]
CMD ["--help"]
