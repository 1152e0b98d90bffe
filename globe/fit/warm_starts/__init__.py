"""Warm starts: one module per init (in-memory and streamed variants and its cost), registered by name."""
