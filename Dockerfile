# syntax=docker/dockerfile:1
#
# gptq-serve production image.
#
#   docker build -t gptq-serve:0.1.0 .
#   docker run --gpus all --read-only --tmpfs /tmp -v gptq-cache:/cache -p 8000:8000 \
#     -e GPTQ_MODEL=TheBloke/Llama-2-13B-GPTQ -e GPTQ_REVISION=main gptq-serve:0.1.0
#
# Two stages:
#   builder  CUDA *devel* image: installs torch and the package into /opt/venv and compiles
#            exllamav2's CUDA extension ahead of time for every architecture in
#            TORCH_CUDA_ARCH_LIST, installed as the importable module `exllamav2_ext`.
#   runtime  CUDA *base* image (no CUDA compiler): the venv is copied over. exllamav2 imports
#            the prebuilt `exllamav2_ext` when it is on the path and only falls back to a JIT
#            build when it is not, so pods never compile it (and could not: no nvcc, read-only
#            root fs).
#
# CUDA_VERSION's major version must match the CUDA build of torch picked by TORCH_INDEX_URL:
# torch.utils.cpp_extension refuses to build against a different major version.
ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS builder

ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# sm_80 A100/A30, sm_86 A10/A40/RTX 30xx, sm_89 L4/L40S/RTX 40xx, sm_90 H100/H200.
ARG TORCH_CUDA_ARCH_LIST="8.0 8.6 8.9 9.0"
# nvcc uses several GB of RAM per job on exllamav2's kernels; lower this on small builders.
ARG MAX_JOBS=8

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Distribution packages follow the base image's release; pinning exact Debian/Ubuntu versions
# breaks the build whenever the archive drops the old version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir "pip==25.3" "setuptools==80.9.0" "wheel==0.45.1"

# torch first and on its own layer: it is the largest and changes least often.
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

# exllamav2 0.3.2 ships only a pure-Python wheel with the C++/CUDA sources inside; importing
# exllamav2.ext without a prebuilt module JIT-compiles them with ninja + nvcc. Do that here,
# for the architectures above (no GPU is needed to compile), then install the result as a
# top-level `exllamav2_ext` module in site-packages.
RUN pip install --no-cache-dir "exllamav2==0.3.2" "ninja==1.13.0" \
    && TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" MAX_JOBS="$MAX_JOBS" \
    TORCH_EXTENSIONS_DIR=/tmp/torch-extensions \
    python -c "import shutil, sysconfig; import exllamav2.ext as ext; shutil.copy2(ext.exllamav2_ext.__file__, sysconfig.get_paths()['platlib'])" \
    && rm -rf /tmp/torch-extensions

# The package itself last, so a code change rebuilds only this layer. Its [cuda] extra pins the
# same exllamav2 and adds triton (already present with a CUDA torch).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY engine ./engine
RUN pip install --no-cache-dir "/src[cuda]" \
    && python -c "import exllamav2.ext as ext; assert not ext.build_jit, 'exllamav2 would JIT-compile'"
# The w4a16 tensor-core kernel (--linear-backend mma), built the same way and installed as the
# importable module `gptq_serve_w4a16_mma`.
RUN TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" MAX_JOBS="$MAX_JOBS" \
    TORCH_EXTENSIONS_DIR=/tmp/torch-extensions python -m engine.model.linear.mma --install \
    && rm -rf /tmp/torch-extensions


FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION} AS runtime

LABEL org.opencontainers.image.title="gptq-serve" \
      org.opencontainers.image.description="OpenAI-compatible server for Llama 2 GPTQ models on ExLlama kernels" \
      org.opencontainers.image.licenses="Apache-2.0"

# tini as PID 1 forwards SIGTERM to the server (which drains on it) and reaps child processes.
# gcc, libc6-dev and python3-dev are for Triton, not for us: it builds its small C launcher
# modules with the host C compiler against Python.h the first time a kernel runs (cached under
# TRITON_CACHE_DIR afterwards). The GPU code itself needs no compiler here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev tini \
    && rm -rf /var/lib/apt/lists/*

# A fixed, high UID/GID (above any host range) so Kubernetes' runAsUser/fsGroup can match it.
RUN groupadd --system --gid 10001 gptq \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
       --shell /usr/sbin/nologin gptq \
    && install -d -o 10001 -g 10001 -m 0750 /cache

# The venv's interpreter is a symlink to /usr/bin/python3: both stages are the same Ubuntu
# release, so the path and Python version match.
COPY --from=builder /opt/venv /opt/venv

# The root filesystem is read-only in Kubernetes: every cache lives under /cache (the model
# cache volume) or /tmp (an emptyDir), and Python never writes bytecode next to the code.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    GPTQ_HOST=0.0.0.0 \
    GPTQ_PORT=8000 \
    GPTQ_MODEL=TheBloke/Llama-2-13B-GPTQ \
    GPTQ_REVISION=main \
    GPTQ_SHUTDOWN_TIMEOUT=30

# Fails the build if the prebuilt extensions cannot be loaded without a compiler, or if the
# transport between the server's two processes (pyzmq, msgspec: installed with the package
# above) is missing.
RUN python -c "import torch, exllamav2_ext, gptq_serve_w4a16_mma" \
    && python -c "import zmq, msgspec"

USER 10001:10001
WORKDIR /tmp
EXPOSE 8000

# /health is the liveness route (no API key); start-period covers a first model download.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GPTQ_PORT', '8000') + '/health', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--", "gptq-serve"]
CMD ["serve"]
