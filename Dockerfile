# authproxy: slim Python, non-root, config mounted at /etc/authproxy/proxy.yaml
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    AUTHPROXY_CONFIG=/etc/authproxy/proxy.yaml

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir ".[speed,redis,metrics,jwt]" \
    && rm -rf /src \
    && useradd --system --uid 10001 --no-create-home authproxy

USER authproxy
WORKDIR /
EXPOSE 8080 9090
# The shipped proxy.yaml listens on 127.0.0.1; in a container mount one that
# listens on 0.0.0.0:8080 (and keep the port on a private network).
ENTRYPOINT ["authproxy", "serve"]
CMD ["--config", "/etc/authproxy/proxy.yaml"]
