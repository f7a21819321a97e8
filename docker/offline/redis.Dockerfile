# Stand-in for Docker Hub's redis:7-bookworm, built from Debian bookworm's own redis-server package (Redis
# 7.0) for machines that reach no image registry (CI here). Like the official image it keeps its data in
# /data, listens on 6379 on every interface, answers `redis-cli ping`, runs `redis-server` with protected
# mode off when no configuration is given (compose passes a password), and runs as the `redis` user (uid
# 999). Unlike it, it starts as that user directly (never root). Not the official image.
FROM sdb-offline/debian:bookworm
LABEL org.opencontainers.image.title="redis:7-bookworm stand-in (Redis 7.0)" \
      org.opencontainers.image.description="Debian bookworm redis-server, built by docker/offline/build.sh; not the official image"
ENV LANG=C.UTF-8
# The user first, with the official image's uid and gid (999), so that USER can be numeric. Versions are not
# pinned: a stand-in takes what bookworm ships.
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 redis \
    && useradd --system --uid 999 --gid redis --home-dir /data --no-create-home --shell /usr/sbin/nologin redis \
    && apt-get -o Acquire::Check-Valid-Until=false update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data \
    && chown redis:redis /data
WORKDIR /data
USER 999:999
VOLUME /data
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
