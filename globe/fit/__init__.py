"""Fitting GloBE banks: the engine (globe.fit.engine: fit_family, fit_model) and its parts.

Kept light on purpose (no re-exports): import from the submodules, e.g. `from globe.fit.engine import fit_model`.
Start reading at globe.fit.engine, whose docstring tells a family fit stage by stage.
"""
