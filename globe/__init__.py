"""GloBE (Global-Basis Experts): compress the routed experts of Mixture-of-Experts LLMs.

Every routed expert's gate and up projection, across all layers, is written as
W_i ~= s_i * A_i @ phi(sum_j alpha_ij B_j) with one shared bank B per family.

    import globe
    result = globe.fit_model("path/to/checkpoint", globe.FitConfig())
    globe.save(result, "out/")
"""
from __future__ import annotations

from globe.artifact import load, save
from globe.errors import GlobeError
from globe.fit.config import BankConfig, FitConfig, SparsityConfig, TrainConfig
from globe.fit.engine import fit_family, fit_model
from globe.core.result import FamilyFit, FitResult
from globe.runtime import apply_globe
from globe.export import export_dense, load_compressed, save_compressed
from globe.eval import evaluate

__version__ = "0.1.0"
__all__ = ["fit_model", "fit_family", "save", "load", "FitConfig", "BankConfig", "SparsityConfig", "TrainConfig",
           "FitResult", "FamilyFit", "GlobeError", "apply_globe", "load_compressed", "save_compressed", "export_dense",
           "evaluate"]
