# syntax=docker/dockerfile:1
# The qna-gateway image: a virtualenv built in one stage, copied into a slim runtime stage that
# runs as a fixed non-root user and writes nothing outside /tmp, so it works with a read-only
# root filesystem (Kubernetes `readOnlyRootFilesystem: true`, `docker run --read-only --tmpfs /tmp`).
#
#   docker build -t qna-gateway:0.1.0 .
#   docker run --rm -p 8000:8000 --read-only --tmpfs /tmp qna-gateway:0.1.0
#
# With no DATABASE_URL the gateway starts an embedded PostgreSQL under /tmp (a demo: the data goes
# with the container); production sets DATABASE_URL or DATABASE_URL_FILE. No secret is baked in:
# they come at run time from the environment or from files (`*_FILE`, Kubernetes Secret volumes).
# Draining takes up to QNA_DRAIN_SECONDS (25) after SIGTERM: give `docker stop` more than Docker's
# default 10 s (`docker stop -t 35`, compose `stop_grace_period: 35s`).

ARG PYTHON_VERSION=3.11

# -- builder: resolve and install the package and its dependencies into /opt/venv -------------
FROM python:${PYTHON_VERSION}-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
WORKDIR /build
# Only what `pip install .` reads: the metadata (README.md is the project's long description)
# and the source. Every dependency ships a wheel, so no compiler is needed.
COPY pyproject.toml README.md ./
COPY src ./src
# pip byte-compiles what it installs: the runtime never needs to write a .pyc.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install . \
    && /opt/venv/bin/qna-gateway --version

# -- runtime -------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime

LABEL org.opencontainers.image.title="qna-gateway" \
      org.opencontainers.image.description="Streaming Q&A gateway: SSE answers from an OpenAI-compatible LLM, kept in PostgreSQL" \
      org.opencontainers.image.licenses="MIT"

# A fixed uid/gid so Kubernetes can check `runAsNonRoot` and match `runAsUser`/`fsGroup`.
# Its home is /tmp: the only writable place when the root filesystem is read-only.
RUN groupadd --system --gid 10001 qna \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin qna

# Same base image as the builder, so the venv's interpreter symlink (/usr/local/bin/python) holds.
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# The default knowledge base, owned by root and read-only for the gateway. Mount a volume (or a
# Kubernetes ConfigMap) on /app/kb to replace it, or point QNA_KB_DIR elsewhere.
COPY kb /app/kb

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    QNA_HOST=0.0.0.0 \
    QNA_PORT=8000 \
    QNA_KB_DIR=/app/kb \
    QNA_DATA_DIR=/tmp/qna-data \
    QNA_LOG_FORMAT=json

USER 10001:10001
EXPOSE 8000

# Docker and compose use this; Kubernetes ignores it and runs its own probes (k8s/base).
# Python's urllib instead of curl: the slim image has no curl. A non-2xx answer raises, exit 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('QNA_PORT', '8000') + '/health', timeout=4)"]

# Exec form: the gateway is PID 1 and receives SIGTERM itself (it drains, then exits 0).
STOPSIGNAL SIGTERM
CMD ["qna-gateway", "serve"]
