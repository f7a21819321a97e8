# Stand-in for Docker Hub's python:3.11-slim-bookworm, built from Debian bookworm's own packages (Python 3.11.2)
# for machines that reach no image registry (CI here). Not the official image: `python` is Debian's
# /usr/bin/python3 and the venv module comes from python3-venv. On a machine with a registry, pull the real one.
FROM sdb-offline/debian:bookworm
LABEL org.opencontainers.image.title="python:3.11-slim-bookworm stand-in" \
      org.opencontainers.image.description="Debian bookworm python3 (3.11), built by docker/offline/build.sh; not the official image"
ENV LANG=C.UTF-8
# Versions are not pinned: a stand-in takes what bookworm ships.
# hadolint ignore=DL3008
RUN apt-get -o Acquire::Check-Valid-Until=false update \
    && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# This machine reaches PyPI only through its own certificate authorities; pip in the image trusts the same
# bundle (the build script puts the host's bundle next to this file).
COPY host-ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
