#!/bin/sh
# The tracking server's entrypoint: `mlflow server ARGS`, on PostgreSQL when POSTGRES_HOST is set. The backend
# URI is built here from the same POSTGRES_* variables the postgres service reads, with each part
# URL-encoded, so a password may hold any character (@ : / % too). It goes to MLflow in the environment,
# not on the command line, where `ps` would show it. Without POSTGRES_HOST: SQLite in the working directory.
set -eu
if [ -n "${POSTGRES_HOST:-}" ]; then
    MLFLOW_BACKEND_STORE_URI=$(python -c '
import os
from urllib.parse import quote

e = os.environ
print("postgresql+psycopg2://{}:{}@{}:{}/{}".format(*(quote(e[k], safe="") for k in (
    "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB"))))')
    export MLFLOW_BACKEND_STORE_URI
fi
exec mlflow server "$@"
