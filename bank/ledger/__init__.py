"""The durable side: schema, SQLite setup, migrations, the writer thread, reads and the audit."""
