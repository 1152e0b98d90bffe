"""Calibration: activation statistics of the routed experts on text (`globe calibrate`), for activation-aware fits."""
from globe.calibration.collect import collect_stats
from globe.calibration.stats import ActivationStats, check_stats_fit, load_stats, save_stats

__all__ = ["ActivationStats", "check_stats_fit", "collect_stats", "load_stats", "save_stats"]
