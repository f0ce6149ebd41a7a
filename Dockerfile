# certwright: the demo CA in a container. Mirrors scripts/setup + scripts/run.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ca ca
COPY acme acme
COPY ocsp ocsp
RUN python -m venv /opt/certwright && /opt/certwright/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends softhsm2 openssl curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /var/lib/certwright certwright
COPY --from=build /opt/certwright /opt/certwright
ENV PATH=/opt/certwright/bin:$PATH \
    CERTWRIGHT_CONFIG=/var/lib/certwright/data/certwright.toml \
    CERTWRIGHT_SERVER__HTTP_LISTEN=0.0.0.0:8080
USER certwright
WORKDIR /var/lib/certwright
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
CMD ["sh", "-c", "certwright init --data-dir data --base-url ${CERTWRIGHT_BASE_URL:-http://127.0.0.1:8080} && exec certwright serve"]
