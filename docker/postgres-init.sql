-- Run once by the postgres image on an empty volume: relman's two roles (shared.roles).
-- relman_owner owns the schema (migrations, the seed); the services connect as
-- relman_app, which the migrate step grants INSERT and SELECT only on audit_logs.
CREATE ROLE relman_owner LOGIN PASSWORD 'relman_owner';
CREATE ROLE relman_app LOGIN PASSWORD 'relman_app';
CREATE DATABASE relman OWNER relman_owner;
