#!/bin/sh
# Run once by the postgres image on an empty volume: relman's two roles (shared.persistence.roles).
# relman_owner owns the schema (migrations, the seed); the services connect as
# relman_app, which the migrate step grants INSERT and SELECT only on audit_logs.
# The passwords come from the environment (docker-compose.yml requires them).
# relman_app's sessions carry their bounds as role defaults (shared.persistence.roles
# SESSION_BOUNDS): behind PgBouncer, which refuses them as startup parameters, only
# these bound them.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v owner_password="$RELMAN_OWNER_PASSWORD" -v app_password="$RELMAN_APP_PASSWORD" <<'SQL'
CREATE ROLE relman_owner LOGIN PASSWORD :'owner_password';
CREATE ROLE relman_app LOGIN PASSWORD :'app_password';
ALTER ROLE relman_app SET statement_timeout = '60s';
ALTER ROLE relman_app SET idle_in_transaction_session_timeout = '120s';
ALTER ROLE relman_app SET client_connection_check_interval = '250ms';
CREATE DATABASE relman OWNER relman_owner;
SQL
