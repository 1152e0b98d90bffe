"""Fit results (moved to globe.core.result, below both fit and runtime); re-exported here."""
from __future__ import annotations

from globe.core.result import FamilyFit, FitResult

__all__ = ["FamilyFit", "FitResult"]
