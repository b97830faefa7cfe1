# Stand-in for the PostgreSQL image (postgres:<version>-bookworm): Debian's PostgreSQL (15, not the tag's) with
# an entrypoint that does what the compose stack uses of the real one: POSTGRES_USER, POSTGRES_PASSWORD and
# POSTGRES_DB create the account and database on an empty PGDATA, `postgres ARGS` runs the server, pg_isready
# answers the healthcheck.
FROM labpipe-standin/debian:bookworm
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends postgresql \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o postgres -g postgres /var/lib/postgresql/data /var/run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
