# certwright: the demo CA in a container. Mirrors scripts/setup + scripts/run (README "Quick
# start"): SoftHSM2 + openssl from Debian, the package in a venv, `certwright init` on first
# start (a no-op afterwards), then `certwright serve`.
#
#   docker build -t certwright .
#   docker run -p 8080:8080 -p 8443:8443 -v certwright-data:/var/lib/certwright/data certwright
#
# The demo keeps its SoftHSM tokens and PIN files in the data volume. In production, give the
# container the PKCS#11 module of a network HSM and PostgreSQL instead (docs/operations.md).

# -- build: the package and its dependencies in a venv, no compiler in the final image -------
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ca ca
COPY acme acme
COPY ocsp ocsp
RUN python -m venv /opt/certwright \
    && /opt/certwright/bin/pip install --no-cache-dir ".[postgres]" \
    && /opt/certwright/bin/certwright --version

# -- run: SoftHSM for the demo token, a non-root user, a health check on /healthz ----------
FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends softhsm2 openssl ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /var/lib/certwright --shell /usr/sbin/nologin \
        certwright \
    && mkdir -p /var/lib/certwright/data && chown certwright: /var/lib/certwright/data
COPY --from=build /opt/certwright /opt/certwright
COPY config/gunicorn.conf.py /etc/certwright/gunicorn.conf.py
# Both listeners on all interfaces inside the container; the published ports decide exposure.
ENV PATH=/opt/certwright/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    CERTWRIGHT_CONFIG=/var/lib/certwright/data/certwright.toml \
    CERTWRIGHT_SERVER__HTTP_LISTEN=0.0.0.0:8080 \
    CERTWRIGHT_SERVER__HTTPS_LISTEN=0.0.0.0:8443
USER certwright
WORKDIR /var/lib/certwright
VOLUME ["/var/lib/certwright/data"]
EXPOSE 8080 8443
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
CMD ["sh", "-c", "certwright init --data-dir data --base-url ${CERTWRIGHT_BASE_URL:-http://127.0.0.1:8080} && exec certwright serve --gunicorn-config /etc/certwright/gunicorn.conf.py"]
