"""GloBE test suite."""
