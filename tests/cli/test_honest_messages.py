"""What the messages say is what happened: an impossible --total-cut states the largest cut and how to get more,
the support warning gives the true temperature and its maximum, a bad --calibration-text is named as such."""
from __future__ import annotations

import logging
import re

import torch

import globe.cli.main as cli
from globe.core.result import FamilyFit, FitResult
from globe.fit.config import FitConfig
from globe.run.fit import warn_support


def test_an_impossible_total_cut_states_the_largest_and_how_to_reach_more(tiny_checkpoint, tmp_path, capsys):
    code = cli.main(["compress", str(tiny_checkpoint("qwen2_moe")), "-o", str(tmp_path / "o"), "--total-cut", "0.95",
                     "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()[-1]                   # (the fixture's bars above it)
    assert code == 2 and err.startswith("globe compress: error: --total-cut 0.95: impossible")
    largest = float(re.search(r"can cut less than ([\d.]+)%", err).group(1))
    more = float(re.search(r"--families gate,up,down allows up to ([\d.]+)%", err).group(1))
    assert 0 < largest < 95 and abs(more - largest * 1.5) < 0.1             # three families of equal size


def test_the_support_warning_gives_the_real_temperature(caplog):
    cfg = FitConfig()
    fam = FamilyFit(family="gate", bank=torch.zeros(2, 2, 2), codes=torch.zeros(2, 2), adapters=torch.zeros(2, 2, 2),
                    scales=torch.ones(2), ids=[(0, 0), (0, 1)], metrics={"median_support": 9.0},
                    history={"am": [{"temperature": 0.61, "median_support": 11.0}]})
    with caplog.at_level(logging.WARNING, logger="globe"):
        assert warn_support(FitResult(families={"gate": fam}, config=cfg, source={})) == ["gate"]
    target = cfg.sparsity.target_support
    assert f"median support 9.0 < target {target} at temperature 0.61 of max 100" in caplog.text
    assert "would not spread further" not in caplog.text


def _short_fit(cfg: FitConfig, m: int, temperature: float, median: float = 7.0) -> FitResult:
    fam = FamilyFit(family="gate", bank=torch.zeros(m, 2, 2), codes=torch.zeros(2, m), adapters=torch.zeros(2, 2, 2),
                    scales=torch.ones(2), ids=[(0, 0), (0, 1)], metrics={"median_support": median},
                    history={"am": [{"temperature": temperature, "median_support": median}]})
    return FitResult(families={"gate": fam}, config=cfg, source={})


def test_a_target_out_of_reach_at_the_maximum_temperature_is_no_warning(caplog):
    """The default run's case: m = 13 atoms for the target 12, all offered at the maximum temperature, non-negative
    codes positive on 7: one INFO line saying why, no WARNING."""
    cfg = FitConfig()
    with caplog.at_level(logging.INFO, logger="globe"):
        assert warn_support(_short_fit(cfg, 13, cfg.sparsity.t_max)) == ["gate"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "median support 7.0 < target 12: out of reach on this bank" in caplog.text
    assert "offers 13 of its 13 atoms" in caplog.text and "--target-support 7" in caplog.text


def test_a_maximum_temperature_that_offers_too_few_atoms_still_warns(caplog):
    cfg = FitConfig()
    cfg.sparsity.t_min, cfg.sparsity.t_init, cfg.sparsity.t_max = 1e-3, 0.01, 0.05
    with caplog.at_level(logging.WARNING, logger="globe"):
        assert warn_support(_short_fit(cfg, 256, 0.05, median=3.0)) == ["gate"]
    assert "median support 3.0 < target 12 at temperature 0.05 of max 0.05, which offers the codes only" in caplog.text
    assert "raise sparsity.t_max" in caplog.text


def test_a_bad_calibration_text_is_named_as_such(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8")
    code = cli.main(["compress", str(tiny_checkpoint("qwen2_moe")), "-o", str(tmp_path / "o"),
                     "--calibration-text", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "--calibration-text file" in err and "--text" not in err.replace("--calibration-text", "")
