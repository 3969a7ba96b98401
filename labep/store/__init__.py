"""The run store (SQLite, readable with the standard library) and the report drawn from it."""
