# Stand-in for Docker Hub's postgres:16-bookworm, built from Debian bookworm's own packages for machines that
# reach no image registry (CI here). It runs PostgreSQL **15** (bookworm ships no 16), so its data directory
# is not compatible with the real image's: use it for tests, never for data you keep.
# Like the official image it reads POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB on first start, keeps its
# data in /var/lib/postgresql/data (PGDATA), listens on 5432 with password (scram-sha-256) logins from the
# network, and answers `pg_isready`. Unlike it, it starts as the `postgres` user directly (never root).
FROM sdb-offline/debian:bookworm
LABEL org.opencontainers.image.title="postgres:16-bookworm stand-in (PostgreSQL 15)" \
      org.opencontainers.image.description="Debian bookworm postgresql-15, built by docker/offline/build.sh; not the official image"
ENV LANG=C.UTF-8 \
    PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
# The user first, with the official image's uid and gid (999), so that USER can be numeric; no default
# cluster: the entrypoint creates one in PGDATA from the POSTGRES_* variables. Versions are not pinned: a
# stand-in takes what bookworm ships.
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 postgres \
    && useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql --shell /bin/bash postgres \
    && mkdir -p /etc/postgresql-common/createcluster.d \
    && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/no-main.conf \
    && apt-get -o Acquire::Check-Valid-Until=false update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p "$PGDATA" /var/run/postgresql \
    && chown postgres:postgres "$PGDATA" /var/run/postgresql \
    && chmod 0700 "$PGDATA"
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER 999:999
VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
