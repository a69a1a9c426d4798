# socket-echo in a container: TCP and UDP echo on 4242, metrics and health on 9100.
#   docker build -t socket-echo .
#   docker run --rm -p 4242:4242/tcp -p 4242:4242/udp -p 9100:9100 socket-echo
# Flags go after the image name (the entrypoint is `socket-echo serve`), or as
# SOCKET_ECHO_* environment variables: docker run -e SOCKET_ECHO_WORKERS=auto ...

FROM python:3.11-slim AS build
# A C compiler for the native data paths (src/socket_echo/*/_native.c): only in this stage.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
# Wheels for the package (with its compiled extensions) and its dependencies; the final stage
# installs them without pip's cache and without a compiler, and runs the native paths.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin echo
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
USER 10001:10001
# All addresses (IPv4 and IPv6 on one socket); JSON logs for the log collector.
ENV SOCKET_ECHO_HOST="::" \
    SOCKET_ECHO_PORT=4242 \
    SOCKET_ECHO_METRICS="[::]:9100" \
    SOCKET_ECHO_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
EXPOSE 4242/tcp 4242/udp 9100/tcp
# Shell form, so that a port changed with SOCKET_ECHO_PORT is the one checked.
HEALTHCHECK --interval=15s --timeout=5s --start-period=5s --retries=3 \
    CMD socket-echo probe --quick --timeout 3 "127.0.0.1:${SOCKET_ECHO_PORT}"
# SIGTERM starts the graceful drain (--graceful-timeout, 10 s): give `docker stop -t 15`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["socket-echo", "serve"]
