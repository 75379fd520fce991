"""Bring your own measurements: the report file format, reading and checking it, localizing it."""
