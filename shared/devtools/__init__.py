"""Tools for a developer's machine, never imported by a service: `make run`, the
embedded PostgreSQL, and the demo seed."""
