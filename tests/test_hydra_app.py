"""Hydra entry point globe.hydra_app (run as `python -m globe.fit_banks`): overrides reach the dataclass configs; a run writes what `globe fit` writes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import globe
from globe.assets import DEFAULT_MODEL_DIR
from globe.cli.main import main
from globe.errors import ConfigError
from globe.fit.config import FitConfig
from globe.hydra_app import compose_run_config, rewrite_model_override
from globe.run.config import CacheConfig, ExportConfig, WandbConfig
from tests.helpers.subproc import subprocess_env

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_dataclass_defaults():
    run = compose_run_config()
    assert run.fit_config() == FitConfig()
    assert run.model.path == str(DEFAULT_MODEL_DIR)
    assert (run.cache, run.export, run.wandb) == (CacheConfig(), ExportConfig(), WandbConfig())


def test_overrides_reach_fit_config():
    run = compose_run_config(["model=/ckpt/dir", "bank.m=256", "bank.r=64", "sparsity.target_support=12",
                              "train.am_iters=7", "train.device=auto", "bank.families=[gate]",
                              "wandb.mode=offline", "export.dir=hf", "export.dense=true", "cache.size=3", "out=o",
                              "activation.stats=calib.safetensors", "activation.steps=7", "train.checkpoint_every=2"])
    cfg = run.fit_config()
    assert (cfg.activation.stats, cfg.activation.steps, cfg.train.checkpoint_every) == ("calib.safetensors", 7, 2)
    assert (cfg.bank.m, cfg.bank.r, cfg.bank.families) == (256, 64, ("gate",))
    assert (cfg.sparsity.target_support, cfg.train.am_iters, cfg.train.device) == (12, 7, "auto")
    assert run.model.path == "/ckpt/dir" and run.wandb.mode == "offline" and run.cache.size == 3
    assert run.export.dir == "hf" and run.export.dense and run.out == "o"
    assert rewrite_model_override(["model=tiny", "model=org/name"]) == ["model=tiny", "model.path=org/name"]


def test_bad_overrides_are_rejected():
    from hydra.errors import ConfigCompositionException
    with pytest.raises(ConfigCompositionException, match="bank.m=many"):
        compose_run_config(["bank.m=many"])                        # typed by the dataclass: int | None
    with pytest.raises(ConfigCompositionException, match="bank.atoms"):
        compose_run_config(["bank.atoms=3"])                       # not a field
    with pytest.raises(ConfigError, match="bank.budget"):
        compose_run_config(["bank.budget=2"]).fit_config()         # FitConfig.validate


def test_run_writes_the_same_artifact_as_globe_fit(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen2_moe")
    assert main(["fit", str(model), "-o", str(tmp_path / "cli"), "--m", "4", "--r", "4", "--target-support", "2",
                 "--am-iters", "3", "--varpro-steps", "5"]) == 0
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "globe.fit_banks", f"model={model}", "bank.m=4", "bank.r=4",
                           "sparsity.target_support=2", "train.am_iters=3", "train.varpro_steps=5", "out=hydra",
                           "export.dir=hydra_hf", "export.dense=true", "log_level=WARNING"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cli, hydra = globe.load(tmp_path / "cli"), globe.load(tmp_path / "hydra")
    for fam in ("gate", "up"):
        assert torch.equal(cli.families[fam].bank, hydra.families[fam].bank)
        assert torch.equal(cli.families[fam].codes, hydra.families[fam].codes)
    assert json.loads((tmp_path / "hydra" / "globe_config.json").read_text())["config"]["bank"]["m"] == 4
    assert (tmp_path / "hydra" / "metrics.jsonl").is_file() and (tmp_path / "hydra_hf" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli", "hydra", "hydra_hf"]   # no outputs/, .hydra, logs


BAD_INPUTS = {                     # config key -> a bad value for it (every key of hydra_app.INPUTS)
    "bank.m": "0", "bank.r": "-1", "bank.budget": "1.5", "sparsity.target_support": "0", "train.am_iters": "-1",
    "train.varpro_steps": "-2", "train.cycles": "0", "train.refine_steps": "-1", "train.seed": "-1",
    "train.checkpoint_every": "-1", "activation.steps": "-1", "cache.size": "0", "cache.warmup_tokens": "-1",
    "model.path": "{tmp}/missing_model", "activation.stats": "{tmp}/missing.safetensors",
}


def test_every_checked_key_has_a_refusal_case():
    from globe.hydra_app import INPUTS
    from globe.cli.inputs import checker
    assert set(BAD_INPUTS) == set(INPUTS)
    assert all(checker("fit", dest) is not None for dest in INPUTS.values())


@pytest.mark.parametrize("key", sorted(BAD_INPUTS))
def test_a_bad_input_is_refused_before_any_work(key, tmp_path, monkeypatch, capsys):
    """The same checks as `globe fit`'s (globe.cli.inputs): exit 2, one line naming the config key, no fit run,
    nothing written."""
    import globe.hydra_app as app
    monkeypatch.chdir(tmp_path)

    def tripwire(*args, **kwargs):
        raise AssertionError("the fit ran before the inputs were checked")
    monkeypatch.setattr(app, "run_fit", tripwire)
    monkeypatch.setattr(app, "resolve_model_dir", tripwire)
    value = BAD_INPUTS[key].format(tmp=tmp_path)
    assert app.main([f"{key}={value}", "out=o", "log_level=WARNING"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"globe.fit_banks: error: {key}"), err
    assert list(tmp_path.iterdir()) == []


def test_outputs_are_checked_before_any_work(tmp_path, tiny_checkpoint):
    """out never inside an input, export.dir not holding the user's files (without overwrite=true) nor inside out;
    nothing is created by the checks."""
    from globe.errors import OutputError
    from globe.hydra_app import check_run_inputs
    model, out, full = tiny_checkpoint("qwen2_moe"), tmp_path / "o", tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    cases = {(str(model / "o"), None): "is inside the input directory",
             (str(out), str(full)): "is not empty",
             (str(out), str(out / "hf")): "are the same place or one lies inside"}
    for (out_dir, export_dir), message in cases.items():
        cfg = compose_run_config([f"model={model}", f"out={out_dir}"])
        cfg.export.dir = export_dir
        with pytest.raises(OutputError, match=message):
            check_run_inputs(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"] and not (model / "o").exists()
    cfg = compose_run_config([f"model={model}", f"out={out}", f"export.dir={full}", "overwrite=true"])
    check_run_inputs(cfg)                                           # overwrite=true: the export may replace it
