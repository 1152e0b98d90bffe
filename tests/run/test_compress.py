"""globe compress end to end on the embedded model: fit at a total cut (hit within 0.5 %), compressed export that
stock from_pretrained loads, dense export, evaluation and model card; fit's --total-cut; bad combinations."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import globe  # noqa: F401  (registers the quantizer)
import globe.cli.main as cli
from globe.assets import DEFAULT_MODEL_DIR
from globe.errors import ConfigError
from globe.fit.config import BankConfig, FitConfig, TrainConfig
from globe.run.compress import WORK_DIR
from globe.run.fit import FitRun, apply_total_cut, run_fit, total_cut_of
from globe.runtime import globe_modules

QUICK = ["--am-iters", "2", "--varpro-steps", "3"]


@pytest.mark.slow
def test_compress_end_to_end_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "small"
    text = DEFAULT_MODEL_DIR / "heldout.txt"
    assert cli.main(["compress", "-o", str(out), "--total-cut", "0.25", "--dense", "--text", str(text),
                     "--eval-tokens", "256", *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "total parameters cut by" in printed and "compressed checkpoint written" in printed
    doc = json.loads((out / "globe_config.json").read_text())
    total = doc["source"]["inventory"]["total_params"]
    saved = sum(doc["params"][f"dense_{f}"] - doc["params"][f] for f in ("gate", "up"))
    assert saved / total == pytest.approx(0.25, abs=0.005)                 # the cut, within 0.5 %
    assert not (out / WORK_DIR).exists() and (out / "metrics.jsonl").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert globe_modules(model) and model.config.quantization_config.quant_method == "globe"
    dense_config = json.loads((tmp_path / "small-dense" / "config.json").read_text())
    assert "quantization_config" not in dense_config                        # an ordinary checkpoint
    card = (out / "README.md").read_text()
    for part in ("## Families", "## Size", "## Evaluation", "## Config", "## Command", "globe compress",
                 str(DEFAULT_MODEL_DIR), "bytes on disk"):
        assert part in card, part
    ids = torch.tensor([[5, 6, 7, 8]])
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small-dense")
    with torch.no_grad():
        gap = (model(input_ids=ids).logits.float() - dense(input_ids=ids).logits.float()).abs().max()
    assert gap < 0.1


def test_total_cut_is_hit_by_the_fit(tmp_path):
    cfg = FitConfig(train=TrainConfig(am_iters=2, varpro_steps=3))
    apply_total_cut(cfg, DEFAULT_MODEL_DIR, 0.40)
    result = run_fit(FitRun(str(DEFAULT_MODEL_DIR), str(tmp_path / "art"), cfg))
    assert total_cut_of(result) == pytest.approx(0.40, abs=0.005)


def test_total_cut_refuses_what_it_cannot_honour(tmp_path, capsys):
    with pytest.raises(ConfigError, match="drop --m"):
        apply_total_cut(FitConfig(bank=BankConfig(m=8)), DEFAULT_MODEL_DIR, 0.25)
    with pytest.raises(ConfigError, match=r"in \(0, 1\)"):
        apply_total_cut(FitConfig(), DEFAULT_MODEL_DIR, 1.5)
    with pytest.raises(ConfigError, match="outside"):
        apply_total_cut(FitConfig(), DEFAULT_MODEL_DIR, 0.9)               # more than the experts hold
    assert cli.main(["fit", "-o", str(tmp_path / "x"), "--total-cut", "0.25", "--budget", "0.5"]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):                                          # argparse: mutually exclusive
        cli.main(["compress", "-o", str(tmp_path / "y"), "--total-cut", "0.25", "--budget", "0.5"])
