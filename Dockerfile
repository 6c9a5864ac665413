# The single executable in a small image, run as a user without privileges.
#   docker build -t livechat .
#   docker run -p 8080:8080 livechat --demo       (then `docker exec` ... `livechat agents add`)

# Build stage: the executable, by the same command as outside a container.
FROM python:3.11-slim-bookworm AS build
# PyInstaller reads and strips shared libraries with binutils (objdump, strip).
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY server ./server
RUN pip install --no-cache-dir . "pyinstaller>=6.0"
COPY static ./static
COPY run.py livechat.spec ./
RUN pyinstaller livechat.spec --noconfirm \
    && ./dist/livechat --help >/dev/null

# Run stage: the same Debian release (its C library), the executable and CA certificates
# (HTTPS to the WhatsApp Cloud API and the AI server); no Python.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /data --create-home livechat
COPY --from=build /src/dist/livechat /usr/local/bin/livechat
USER livechat
WORKDIR /data
# The embedded store's file lives in /data (mount a volume there to keep it).
# The container's own interface: reached only through the ports it publishes, so listening
# beyond loopback is what is meant here, in development too.
ENV HOST=0.0.0.0 \
    LIVECHAT_ALLOW_REMOTE=true \
    PORT=8080 \
    LIVECHAT_DB=/data/livechat.db \
    LOG_FORMAT=json
EXPOSE 8080
# The server stops gracefully on SIGTERM (what `docker stop` sends).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/livechat"]
