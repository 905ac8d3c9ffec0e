# authproxy: slim Python, non-root, deploy/proxy.container.yaml as the default
# config at /etc/authproxy/proxy.yaml (mount a ConfigMap or a file over it).
#
# Base image pinned by digest; the tag it was taken from:
#   python:3.11.10-slim-bookworm
# To move it: docker pull python:3.11-slim-bookworm &&
#   docker inspect --format '{{index .RepoDigests 0}}' python:3.11-slim-bookworm
FROM python:3.11.10-slim-bookworm@sha256:5148c0e4bbb64271bca1d3322360ebf4bfb7564507ae32dd639322e4952a6b16

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AUTHPROXY_CONFIG=/etc/authproxy/proxy.yaml \
    AUTHPROXY_HEALTHZ=http://127.0.0.1:9090/healthz

RUN groupadd --system --gid 10001 authproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin authproxy

WORKDIR /src

# 1. Dependencies only (the layer stays cached while only the source changes):
#    the runtime requirements and the speed, redis and jwt extras, read from
#    pyproject.toml itself so that there is no second list to keep in step.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; x = p['optional-dependencies']; print('\n'.join(p['dependencies'] + x['speed'] + x['redis'] + x['jwt']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 2. The package itself, without touching the dependencies again.
COPY README.md LICENSE ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --no-deps . \
    && cd / && rm -rf /src

# 3. The container-ready config (0.0.0.0:8080, admin on 0.0.0.0:9090 with a
#    bearer token from /run/secrets/authproxy/admin-token).
COPY deploy/proxy.container.yaml /etc/authproxy/proxy.yaml

USER 10001:10001
WORKDIR /
EXPOSE 8080 9090

# /healthz needs no admin token. Python, because the slim image has no curl;
# set AUTHPROXY_HEALTHZ when your config moves the admin port.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['AUTHPROXY_HEALTHZ'], timeout=2)"]

ENTRYPOINT ["authproxy", "serve"]
CMD ["--config", "/etc/authproxy/proxy.yaml"]
