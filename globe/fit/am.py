"""Kept only for globe.fit.resume (owned by the on-disk formats work), which imports AMState from here: the AM
solver is globe.fit.solvers.am. Remove once resume imports globe.fit.solvers.am."""
from globe.fit.solvers.am import AMState

__all__ = ["AMState"]
