"""Shared test helpers (tiny model factories)."""
