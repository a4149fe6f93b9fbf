"""`make bench`: both services as real processes on a fresh database, driven over real
channels, each scenario measured against a baseline taken in the same run.

Absolute figures depend on the machine, so every target that can be is a ratio
against a baseline measured here and now (a no-op gRPC call, a raw asyncpg COPY,
psql's \\copy of the same query). `python -m bench --quick` runs every scenario
at a small size, to keep the harness working (`make test` does); its figures
mean little.
"""
