"""The one PostgreSQL schema and how to reach it: models, migrations, the two
database roles, units of work, keyset pages, and the one shape of an audit row."""
