"""Calibration: activation statistics of the routed experts on text (`globe calibrate`), for activation-aware fits."""
from globe.calibration.collect import collect_stats
from globe.calibration.stats import ActivationStats, load_stats, save_stats

__all__ = ["ActivationStats", "collect_stats", "load_stats", "save_stats"]
