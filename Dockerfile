# syntax=docker/dockerfile:1
# m3-queue: one image for every `m3q` command (the worker, the HTTP gateway, the CLI), with the project and
# its worker, http and parquet extras installed, so a container starts without reaching a package index.
#
#   docker build -t m3-queue:cpu .                           # CPU torch, no CUDA libraries
#   docker build -t m3-queue:cuda --build-arg TORCH=cuda .   # PyPI's torch with its CUDA libraries (GBs)
#   docker run --rm m3-queue:cpu worker --help
#
# TORCH picks the torch build: cpu (PyTorch's CPU wheel index), cuda (the default wheel from PyPI, which
# bundles its CUDA libraries; the host needs only the NVIDIA driver and container toolkit), or the name of
# another PyTorch wheel index such as cu126 (a CUDA build for an older driver).
# Versions come from .ci/constraints.txt, the set CI tests, so two builds of one commit install the same
# packages (PYTHON_IMAGE can pin the base image by digest too). There is no HEALTHCHECK: the right probe
# depends on the command (the gateway's /health, the worker's metrics port, none for a one-off CLI
# command), so docker-compose.yml sets one per service.

ARG PYTHON_IMAGE=python:3.11-slim-trixie

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/m3q/bin:$PATH
RUN python -m venv /opt/m3q
WORKDIR /src
COPY .ci/constraints.txt .ci/constraints.txt
# torch in a layer of its own, before the sources: it is most of the image and changes only with TORCH or
# the constraints. A wheel index other than PyPI serves torch alone (--no-deps): its dependencies come from
# PyPI in the next step, so no other package can be taken from that index.
RUN --mount=type=cache,target=/root/.cache/pip \
    case "$TORCH" in \
      cuda) pip install -c .ci/constraints.txt torch ;; \
      cpu|cu[0-9]*) pip install --no-deps --index-url "https://download.pytorch.org/whl/$TORCH" \
                      -c .ci/constraints.txt torch ;; \
      *) echo "TORCH=$TORCH: use cpu, cuda, or a PyTorch wheel index such as cu126" >&2; exit 2 ;; \
    esac
COPY pyproject.toml README.md LICENSE ./
COPY producer producer
COPY worker worker
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c .ci/constraints.txt ".[worker,http,parquet]" \
 && pip check

FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH=cpu
LABEL org.opencontainers.image.title="m3-queue" \
      org.opencontainers.image.description="BGE-M3 embeddings on a Celery + Redis queue, into Milvus" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.m3q.torch="$TORCH"
# A fixed numeric id, so Kubernetes' runAsNonRoot can check it; the cache folder is made here, owned by
# that user, because Docker copies its owner into a new named volume mounted on it.
RUN useradd --no-log-init --create-home --uid 10001 --user-group m3q \
 && install -d -o m3q -g m3q /home/m3q/.cache/huggingface
COPY --from=builder /opt/m3q /opt/m3q
ENV PATH=/opt/m3q/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/m3q/.cache/huggingface \
    M3Q_METRICS_PORT=9400 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/home/m3q/.cache/huggingface"]
USER 10001:10001
WORKDIR /home/m3q
# 8080: `m3q serve --host 0.0.0.0` (its default port); 9400: a worker's Prometheus metrics (M3Q_METRICS_PORT).
EXPOSE 8080 9400
ENTRYPOINT ["m3q"]
CMD ["--help"]
