"""PostgreSQL: the pool, migrations, an embedded server, and the queries."""
