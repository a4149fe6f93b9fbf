"""Tools for a developer's machine: `make run`, the embedded PostgreSQL, and the demo
seed. A service reaches only the embedded PostgreSQL, and only when DATABASE_URL is
unset (shared.persistence.db)."""
