# Stand-in for Docker Hub's prom/prometheus:v2.53.2 (the compose `monitoring` profile), built from Debian
# bookworm's own `prometheus` package (Prometheus 2.42) for machines that reach no image registry (CI here).
# Like the official image it runs /bin/prometheus (/bin is /usr/bin in bookworm) as `nobody` (uid 65534) in
# /prometheus (its data, a volume), reads /etc/prometheus/prometheus.yml and listens on 9090; compose passes
# the same arguments to either. Not the official image: an older Prometheus, for tests and offline machines.
FROM sdb-offline/debian:bookworm
LABEL org.opencontainers.image.title="prom/prometheus:v2.53.2 stand-in (Prometheus 2.42)" \
      org.opencontainers.image.description="Debian bookworm prometheus, built by docker/offline/build.sh; not the official image"
ENV LANG=C.UTF-8
# Versions are not pinned: a stand-in takes what bookworm ships. The package's own service files and
# default configuration are not used (compose mounts the configuration). Debian's binary keeps its data in
# /var/lib/prometheus/metrics2 when no --storage.tsdb.path is given (compose gives none): that is /prometheus.
# hadolint ignore=DL3008
RUN apt-get -o Acquire::Check-Valid-Until=false update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown 65534:65534 /prometheus \
    && rm -rf /var/lib/prometheus/metrics2 \
    && ln -s /prometheus /var/lib/prometheus/metrics2
WORKDIR /prometheus
USER 65534:65534
VOLUME /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
