# Stand-in for the Python base (python:<version>-slim-bookworm): Debian bookworm with its own Python (3.11, not
# the tag's), pip and venv, `python` and `pip` on PATH and no PEP 668 marker, as in the real image.
FROM labpipe-standin/debian:bookworm
COPY ca/ /usr/local/share/ca-certificates/
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip python3-venv \
    && update-ca-certificates && rm -rf /var/lib/apt/lists/* \
    && rm -f /usr/lib/python3.*/EXTERNALLY-MANAGED \
    && ln -s /usr/bin/python3 /usr/local/bin/python
ENV LANG=C.UTF-8
CMD ["python3"]
