"""Sionna RT: scenes and sites, ray tracing, radio-map generation, link abstraction, measurements."""
