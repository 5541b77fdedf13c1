# syntax=docker/dockerfile:1
# EventLive Edge image.
#   docker build -t eventlive-edge:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9091:9091 \
#     -e SUPABASE_URL=https://<ref>.supabase.co -e APP_URL=http://host.docker.internal:3000 \
#     -e REDIS_URL=redis://host.docker.internal:6379/0 eventlive-edge:0.1.0
# The default config is k8s/base/config.yaml (the same file the Kubernetes ConfigMap
# carries); mount your own at /etc/gateway/config.yaml to replace it.
# Stage 1 builds the project's wheel and installs it with its dependencies into a venv;
# stage 2 is the same base image plus that venv only: no compilers, no pip cache, no
# source tree, no build tools. Both stages use the same pinned tag, so the venv's
# interpreter path and ABI match.

FROM python:3.11.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
# Only what the wheel needs (.dockerignore keeps the rest out of the context).
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# The same wheel build tests/test_deploy.py runs on the build context; every dependency
# ships manylinux wheels for CPython 3.11 (amd64 and arm64), so nothing compiles here.
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && /opt/venv/bin/python -m pip install /dist/*.whl \
 && /opt/venv/bin/python -m gateway --help >/dev/null

FROM python:3.11.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="eventlive-edge" \
      org.opencontainers.image.description="ASGI edge gateway in front of a Next.js + Supabase webinar app"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed numeric uid/gid, so Kubernetes can verify runAsNonRoot without a passwd lookup.
RUN groupadd --system --gid 10001 edge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin edge
COPY --from=builder /opt/venv /opt/venv
COPY k8s/base/config.yaml /etc/gateway/config.yaml
USER 10001:10001
# 8080: public (server.listen); 9091: admin — /healthz /readyz /metrics (server.admin_listen).
EXPOSE 8080 9091
# The gateway drains on SIGTERM (readiness 503, stop accepting, finish in-flight requests).
STOPSIGNAL SIGTERM
# Liveness for plain Docker / Compose; Kubernetes uses its own probes on the same path.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9091/healthz', timeout=2).status != 200)"]
# Exec form: python is PID 1 and receives SIGTERM itself. `docker run IMAGE check
# --config F` validates a config with the same entrypoint.
ENTRYPOINT ["python", "-m", "gateway"]
CMD ["serve", "--config", "/etc/gateway/config.yaml"]
