# syntax=docker/dockerfile:1
# The SDB service image: `sdb serve` by default; `sdb worker` and `ray start` (compose) use it too.
#
#   docker build -t sdb .                      CPU (the last stage, the default target)
#   docker build --target gpu -t sdb:gpu .     CUDA: torch's CUDA wheel and onnxruntime-gpu (host driver >= 580)
#
# Nothing secret is in the image: the master key, the pepper and the database password come
# from files mounted at run time (compose secrets; see docker-compose.yml and docs/deploy.md).
# Without them the server creates the master key and pepper in /data-secrets (the default
# secrets dir beside the data dir: mode 0700, a volume of its own), never in /data, where jobs
# read files.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu 1.31.1's PyPI wheel is built for CUDA 13.0 with cuDNN 9 (libcudart.so.13, libcublas.so.13,
# libcudnn.so.9): the CUDA 13 runtime image with cuDNN, Ubuntu 22.04 for its Python 3.11.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04

# --------------------------------------------------------------------------- GPU
FROM ${CUDA_IMAGE} AS gpu-base
# Ubuntu 22.04's own Python 3.11 (the project supports 3.11 only); versions follow the CUDA image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS gpu-build
# pyproject.toml's `gpu` extra (tests/test_packaging.py holds them equal): onnxruntime-gpu has no
# release of the lock's onnxruntime version, so the version is its own.
ARG ORT_GPU_VERSION=1.31.1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/sdb
WORKDIR /src
COPY requirements.lock ./
# The lock, with onnxruntime swapped for onnxruntime-gpu (one `onnxruntime` module, two wheels, never
# both); torch from PyPI, whose Linux wheel is the CUDA build. ONNX Runtime then offers its CUDA
# provider and the server takes it first, the CPU provider after it (SDB_ORT_PROVIDERS).
RUN grep -v '^onnxruntime==' requirements.lock > requirements-gpu.lock \
 && /opt/sdb/bin/pip install -r requirements-gpu.lock "onnxruntime-gpu==${ORT_GPU_VERSION}"
COPY pyproject.toml README.md ./
COPY sdb_core sdb_core
COPY service service
COPY sdb_cli sdb_cli
COPY clients/python clients/python
RUN /opt/sdb/bin/pip install --no-deps . ./clients/python

FROM gpu-base AS gpu
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/sdb sdb \
 && mkdir /data /data-secrets && chown sdb:sdb /data /data-secrets && chmod 700 /data-secrets
COPY --from=gpu-build /opt/sdb /opt/sdb
ENV PATH=/opt/sdb/bin:$PATH PYTHONUNBUFFERED=1 MPLCONFIGDIR=/tmp/matplotlib \
    SDB_DATA_DIR=/data SDB_HOST=0.0.0.0
USER 10001:10001
WORKDIR /home/sdb
VOLUME ["/data", "/data-secrets"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('SDB_PORT', '8000') + '/healthz', timeout=4)"]
ENTRYPOINT ["sdb"]
CMD ["serve"]

# --------------------------------------------------------------------------- CPU (default)
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/sdb
WORKDIR /src
COPY requirements.lock ./
# torch's CPU wheel (PyPI's Linux wheel bundles CUDA: gigabytes a CPU image never uses).
# torch==X matches X+cpu, and pip prefers the +cpu build.
RUN /opt/sdb/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.lock
COPY pyproject.toml README.md ./
COPY sdb_core sdb_core
COPY service service
COPY sdb_cli sdb_cli
COPY clients/python clients/python
RUN /opt/sdb/bin/pip install --no-deps . ./clients/python

FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/sdb sdb \
 && mkdir /data /data-secrets && chown sdb:sdb /data /data-secrets && chmod 700 /data-secrets
COPY --from=build /opt/sdb /opt/sdb
ENV PATH=/opt/sdb/bin:$PATH PYTHONUNBUFFERED=1 MPLCONFIGDIR=/tmp/matplotlib \
    SDB_DATA_DIR=/data SDB_HOST=0.0.0.0
USER 10001:10001
WORKDIR /home/sdb
VOLUME ["/data", "/data-secrets"]
EXPOSE 8000
# /healthz answers while the process lives; the port follows SDB_PORT like `sdb serve` does.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:' + os.environ.get('SDB_PORT', '8000') + '/healthz', timeout=4)"]
ENTRYPOINT ["sdb"]
CMD ["serve"]
