# syncproxy: an HTTP/1.1-only TLS front end with the bundled Anki sync core.
#
#   docker build -t syncproxy .
#   docker run -d -p 443:8443 -v syncproxy-data:/data syncproxy
#   docker run -d -p 444:444 -v syncproxy-data:/data syncproxy --port 444
#
# The anki wheels need glibc >= 2.35 and exist only for x86_64 and aarch64, so the base is Debian
# bookworm: Alpine (musl) and 32-bit ARM cannot run the sync core. Both stages must use the same
# base because the virtual environment links to the base image's python3.

FROM python:3.11-slim-bookworm AS build

# Package index settings, read by every pip call below (including the isolated build of the
# syncproxy wheel). Unset, pip uses its default index. Example for a mirror:
#   --build-arg PIP_INDEX_URL=https://pypi.tuna.tsinghua.edu.cn/simple
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY syncproxy ./syncproxy

# `python3`, not `python`: Debian's own python3 package has no `python` command.
RUN python3 -m venv /opt/syncproxy \
    && /opt/syncproxy/bin/pip install /src \
    && /opt/syncproxy/bin/syncproxy --help > /dev/null


FROM python:3.11-slim-bookworm

# The account syncproxy runs as. Change it at build time to match the owner of a bind-mounted
# data directory, or at run time with `--user UID:GID` (then /data must be writable by that UID).
ARG SYNCPROXY_UID=10001
ARG SYNCPROXY_GID=10001

RUN groupadd --system --gid "${SYNCPROXY_GID}" syncproxy \
    && useradd --system --uid "${SYNCPROXY_UID}" --gid syncproxy \
        --home-dir /data --no-create-home --shell /usr/sbin/nologin syncproxy \
    && mkdir /data \
    && chown "${SYNCPROXY_UID}:${SYNCPROXY_GID}" /data \
    && chmod 0700 /data

COPY --from=build /opt/syncproxy /opt/syncproxy

# Every setting is also read from a SYNCPROXY_* variable; only the data directory is fixed here,
# so that users, collections, certificates and the config file all live in the one volume.
ENV PATH=/opt/syncproxy/bin:$PATH \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SYNCPROXY_DATA_DIR=/data

# A numeric user lets Kubernetes' runAsNonRoot check the image without resolving names.
USER ${SYNCPROXY_UID}:${SYNCPROXY_GID}
WORKDIR /data
VOLUME ["/data"]

# syncproxy's default port; `--port N` or SYNCPROXY_PORT changes it.
EXPOSE 8443

HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["syncproxy", "health"]

ENTRYPOINT ["syncproxy"]
CMD ["serve"]
