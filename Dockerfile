# dcapd container image: one dcapd process (waitress), plain HTTP on port 8081 for an
# ingress or reverse proxy that terminates TLS. Build and run: see README.rst, "Containers".
#
#   docker build -t dcapd:0.1.0 .
#   docker run -d -p 8081:8081 -v dcapd-cache:/var/cache/dcapd --read-only --tmpfs /tmp \
#       --env-file dcapd.env dcapd:0.1.0
#
# Every setting can be given as an environment variable (its DCAPD_* name, as in
# pccs.ini.example; the Intel API key is INTEL_API_KEY), or in an ini file named by
# DCAPD_CONFIG. Secrets (INTEL_API_KEY, DCAPD_USER_TOKEN_SHA512, DCAPD_ADMIN_TOKEN_SHA512)
# belong in the runtime environment (--env-file, a Kubernetes Secret), never in the image.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A dedicated user with a fixed numeric id (Kubernetes runAsNonRoot can check it).
RUN groupadd --system --gid 10001 dcapd \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/cache/dcapd \
       --shell /usr/sbin/nologin dcapd \
    && install -d -o 10001 -g 10001 -m 0700 /var/cache/dcapd

WORKDIR /src
COPY setup.cfg pyproject.toml README.rst ./
COPY dcapd ./dcapd
RUN pip install . && rm -rf /src

# The image's defaults; override any of them (and any other setting) with -e / env.
# TLS is off: the ingress or proxy in front terminates it (DCAPD_TLS=auto serves HTTPS).
ENV DCAPD_LISTEN=0.0.0.0:8081 \
    DCAPD_TLS=off \
    DCAPD_CACHE_DIR=/var/cache/dcapd \
    DCAPD_LOG_FORMAT=json

VOLUME /var/cache/dcapd
EXPOSE 8081
USER 10001:10001
WORKDIR /var/cache/dcapd

# Liveness: /healthz answers while the process runs (no curl in the slim image: Python).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request as r; s = 'http' if os.environ.get('DCAPD_TLS') == 'off' else 'https'; r.urlopen(s + '://127.0.0.1:8081/healthz', timeout=4, context=ssl._create_unverified_context())"]

ENTRYPOINT ["dcapd"]
