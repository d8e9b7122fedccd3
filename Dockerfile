# syntax=docker/dockerfile:1
# devicegate: one image for every role; the command picks it:
#   docker run IMAGE db migrate | ca init ... | serve provisioning | serve gateway
# Build: docker build -t devicegate .

# --- build: a self-contained virtualenv -----------------------------------------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# Every dependency ships manylinux wheels for amd64 and arm64; the compiler is for
# devicegate's own C accelerators: the auth event encoder (gateway/events/_codec.c) and the
# gateway's TLS accelerator (gateway/_tlsext.c, which needs OpenSSL's headers: the image's
# Python links Debian's libssl3, and so does the accelerator).
# This stage is thrown away, so the runtime image carries no compiler.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python -m venv /opt/devicegate
WORKDIR /src
# Metadata first, so the layer with the dependencies is reused while only code changes.
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY gateway ./gateway
COPY provisioning ./provisioning
# The import check fails the build if an accelerator was skipped (they are optional to
# pip) or the TLS one links another OpenSSL than Python's _ssl (it refuses to load then).
RUN /opt/devicegate/bin/pip install --no-cache-dir . \
 && /opt/devicegate/bin/python -c "import gateway.events._codec, gateway._tlsext" \
 && /opt/devicegate/bin/python -m compileall -q /opt/devicegate/lib

# --- runtime: the virtualenv and nothing else -----------------------------------------
FROM python:3.11-slim
# A fixed uid/gid, so volumes and Kubernetes fsGroup/runAsUser can name it.
RUN groupadd --system --gid 10001 devicegate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/devicegate --shell /usr/sbin/nologin devicegate \
 && install -d -o 10001 -g 10001 -m 0700 \
        /var/lib/devicegate /var/lib/devicegate/pki /var/lib/devicegate/pki-gateway \
        /var/lib/devicegate/root-offline /var/lib/devicegate/spool
# Same base image and path as the build stage, so the venv's interpreter link resolves.
COPY --from=build /opt/devicegate /opt/devicegate
ENV PATH=/opt/devicegate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEVICEGATE_PKI_DIR=/var/lib/devicegate/pki \
    DEVICEGATE_SPOOL_DIR=/var/lib/devicegate/spool
USER 10001:10001
WORKDIR /var/lib/devicegate
# 8443 provisioning, 8883 gateway, 9464 metrics (loopback unless DEVICEGATE_METRICS_LISTEN
# says otherwise). All above 1024: the container needs no capability.
EXPOSE 8443 8883 9464
# No HEALTHCHECK here: the right probe depends on the role (provisioning: HTTPS /readyz;
# gateway: the metrics endpoint), so compose.yaml and the Kubernetes probes define it.
HEALTHCHECK NONE
# The gateway drains on SIGTERM (Docker's default stop signal); give it time to:
# docker stop --time 90, compose stop_grace_period, terminationGracePeriodSeconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["devicegate"]
CMD ["--help"]
