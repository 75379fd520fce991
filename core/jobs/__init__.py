"""Background jobs: every job is a ``python -m core ...`` process registered in SQLite; progress reporting."""
