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
QUICK_CALIBRATION = ["--calibration-tokens", "256", "--activation-steps", "2", "--distill-steps", "2"]
SMALL = ["--families", "gate", "--m", "6", "--r", "16", "--target-support", "3", "--am-iters", "1",
         "--varpro-steps", "1", "--init", "svd"]


@pytest.mark.slow
def test_compress_end_to_end_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "small"
    text = DEFAULT_MODEL_DIR / "heldout.txt"
    assert cli.main(["compress", "-o", str(out), "--total-cut", "0.25", "--dense", "--text", str(text),
                     "--eval-tokens", "256", *QUICK, *QUICK_CALIBRATION, "--expert-steps", "0"]) == 0
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


def _scored_tokens(n: int, window: int = 256) -> int:
    """Targets disjoint windows of `window` tokens score over n tokens: all but each window's first."""
    return sum(min(window, n - start) - 1 for start in range(0, n, window))


def test_compress_without_text_calibrates_on_self_generated_text_and_scores_all_of_text(tmp_path, capsys):
    from globe.eval import encode_text
    from globe.run.tokenizer import load_tokenizer
    text = tmp_path / "heldout.txt"
    text.write_text((DEFAULT_MODEL_DIR / "heldout.txt").read_text(encoding="utf-8")[:9000], encoding="utf-8")
    n = encode_text(load_tokenizer(DEFAULT_MODEL_DIR), text.read_text(encoding="utf-8")).numel()
    assert n > 4096 // 2 and n % 256 not in (0, 1)
    out = tmp_path / "small"
    assert cli.main(["compress", "-o", str(out), *SMALL, *QUICK_CALIBRATION, "--seed", "3", "--text", str(text)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "globe_config.json").read_text())
    cal = doc["source"]["calibration"]
    assert (cal["source"], cal["tokens"], cal["seed"], cal["temperature"]) == ("self-generated", 256, 3, 1.0)
    assert doc["config"]["activation"]["stats"]                              # the fit was activation-aware
    assert "act_rel_err" in doc["metrics"]["gate"]
    assert f"(activation-weighted, minimised: {doc['metrics']['gate']['act_rel_err']:.4f})" in printed
    assert "calibrated on 256 tokens the model generated itself (seed 3" in printed
    expected = _scored_tokens(n)
    assert f"over {expected:,} tokens" in printed and "KL" in printed and "top-1 agreement" in printed
    card = (out / "README.md").read_text()
    assert "## Calibration" in card and "256 tokens the model generated itself" in card and "seed 3" in card
    assert "| compressed | " in card and "KL to the original" in card


def test_compress_calibrates_on_the_given_text_or_not_at_all(tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text((DEFAULT_MODEL_DIR / "heldout.txt").read_text(encoding="utf-8")[-3000:], encoding="utf-8")
    out = tmp_path / "text"
    assert cli.main(["compress", "-o", str(out), *SMALL, *QUICK_CALIBRATION, "--calibration-text", str(calib)]) == 0
    cal = json.loads((out / "globe_config.json").read_text())["source"]["calibration"]
    assert (cal["source"], cal["text"], cal["tokens"]) == ("text", str(calib.resolve()), 256)
    assert cal["self_generated"]["tokens"] == 256 and cal["total_tokens"] == 512      # mixed by default
    assert (f"calibrated on the first 256 tokens of {calib.resolve()} and 256 tokens the model generated itself"
            in capsys.readouterr().out)
    assert f"the first 256 tokens of `{calib.resolve()}` and 256 tokens the model generated" in \
        (out / "README.md").read_text()
    alone = tmp_path / "alone"
    assert cli.main(["compress", "-o", str(alone), *SMALL, *QUICK_CALIBRATION, "--calibration-text", str(calib),
                     "--calibration-mix", "0"]) == 0
    cal = json.loads((alone / "globe_config.json").read_text())["source"]["calibration"]
    assert cal["tokens"] == 256 and "self_generated" not in cal
    assert "generated itself" not in capsys.readouterr().out
    plain = tmp_path / "plain"
    assert cli.main(["compress", "-o", str(plain), *SMALL, "--no-calibration"]) == 0
    doc = json.loads((plain / "globe_config.json").read_text())
    assert doc["source"]["calibration"]["source"].startswith("none") and doc["config"]["activation"]["stats"] is None
    assert "act_rel_err" not in doc["metrics"]["gate"] and "not calibrated" in capsys.readouterr().out


def test_bad_calibration_inputs_fail_before_any_work(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1") * 20)
    for extra, words in ((["--calibration-text", str(bad)], ["--calibration-text", "UTF-8"]),
                         (["--calibration-tokens", "1"], ["token count"]),
                         (["--calibration-mix", "-0.5"], ["--calibration-mix", ">= 0"]),
                         (["--calibration-mix", "2"], ["--calibration-mix", "only with --calibration-text"]),
                         (["--sensitivity", "on", "--no-calibration"], ["--sensitivity on", "--no-calibration"]),
                         (["--text", str(bad)], ["--text", "UTF-8"]),
                         (["--eval-tokens", "1"], ["--eval-tokens"])):
        out = tmp_path / "never"
        assert cli.main(["compress", "-o", str(out), *SMALL, *extra]) != 0
        err = capsys.readouterr().err
        assert all(w in err for w in words), (extra, err)
        assert not out.exists()
