"""Every bad input from the reliability issue, through the real CLI: exit code 2, exactly one line on stderr
that names the file/tensor at fault (and what to do), no traceback, and no output left behind.

Each case is (name, setup) where setup(tmp_path, make) prepares the fault and returns (argv, expected fragments,
paths that must not exist afterwards). `make(arch)` gives a private copy of a tiny checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import globe
from globe.cli.main import main
from tests.helpers.fits import quick_fit

QUICK = ["--m", "4", "--r", "4", "--target-support", "2", "--am-iters", "2", "--varpro-steps", "3"]
GATE = "model.layers.0.mlp.experts.2.gate_proj.weight"


def _edit(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _fit(model: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", str(model), "-o", str(out), *QUICK, *extra]


def missing_model_dir(tmp, make):
    return _fit(tmp / "nope", tmp / "out"), ["nope", "does not exist"], [tmp / "out"]


def config_json_missing(tmp, make):
    model = make("qwen2_moe")
    (model / "config.json").unlink()
    return _fit(model, tmp / "out"), ["config.json", str(model)], [tmp / "out"]


def config_json_invalid(tmp, make):
    model = make("qwen2_moe")
    (model / "config.json").write_text('{"model_type": "qwen2_moe",')
    return _fit(model, tmp / "out"), ["config.json", "not valid JSON"], [tmp / "out"]


def unsupported_model_type(tmp, make):
    model = make("qwen2_moe")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    return _fit(model, tmp / "out"), ["llama", "qwen2_moe", "mixtral"], [tmp / "out"]


def index_names_missing_shard(tmp, make):
    model = make("qwen2_moe", shards=2)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (model / victim).unlink()
    return _fit(model, tmp / "out"), [victim], [tmp / "out"]


def truncated_safetensors(tmp, make):
    model = make("qwen2_moe")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return _fit(model, tmp / "out"), ["model.safetensors"], [tmp / "out"]


def garbage_safetensors(tmp, make):
    model = make("qwen2_moe")
    (model / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    return _fit(model, tmp / "out"), ["model.safetensors"], [tmp / "out"]


def tensor_with_wrong_shape(tmp, make):
    model = make("qwen2_moe")
    _edit(model, lambda t: t.__setitem__(GATE, t[GATE][:-1].clone()))
    return _fit(model, tmp / "out"), ["model.layers.0.mlp.experts.2.gate_proj"], [tmp / "out"]


def tensor_with_wrong_dtype(tmp, make):
    model = make("qwen2_moe")
    _edit(model, lambda t: t.__setitem__(GATE, t[GATE].to(torch.int8)))
    return _fit(model, tmp / "out"), [GATE, "int8"], [tmp / "out"]


def nan_in_weights(tmp, make):
    model = make("qwen2_moe")

    def poison(t):
        t[GATE] = t[GATE].clone()
        t[GATE][0, 0] = float("nan")
    _edit(model, poison)
    return _fit(model, tmp / "out"), [GATE, "NaN"], [tmp / "out"]


def output_is_a_file(tmp, make):
    (tmp / "file").write_text("user data")
    return _fit(make("qwen2_moe"), tmp / "file"), ["file", "not a directory"], []


def output_under_a_file(tmp, make):
    (tmp / "file").write_text("user data")
    return _fit(make("qwen2_moe"), tmp / "file" / "out"), ["file", "not writable"], []


def output_not_empty(tmp, make):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("user data")
    return _fit(make("qwen2_moe"), tmp / "out"), ["not empty", "--overwrite"], []


def m_not_positive(tmp, make):
    return _fit(make("qwen2_moe"), tmp / "out", "--m", "0"), ["bank.m", "> 0"], [tmp / "out"]


def target_support_above_m(tmp, make):
    return (_fit(make("qwen2_moe"), tmp / "out", "--target-support", "9"), ["target_support", "bank.m"],
            [tmp / "out"])


def r_above_min_p_d(tmp, make):
    return _fit(make("qwen2_moe"), tmp / "out", "--r", "500"), ["bank.r (500)", "min(p, d)"], [tmp / "out"]


def budget_out_of_range(tmp, make):
    return (["fit", str(make("qwen2_moe")), "-o", str(tmp / "out"), "--budget", "1.5"], ["bank.budget", "(0, 1)"],
            [tmp / "out"])


def config_file_unknown_key(tmp, make):
    (tmp / "fit.yaml").write_text("bank:\n  atoms: 8\n")
    return (_fit(make("qwen2_moe"), tmp / "out", "--config", str(tmp / "fit.yaml")), ["fit.yaml", "atoms"],
            [tmp / "out"])


def config_file_newer_format(tmp, make):
    (tmp / "fit.json").write_text(json.dumps({"format_version": 7, "bank": {"m": 4}}))
    return (_fit(make("qwen2_moe"), tmp / "out", "--config", str(tmp / "fit.json")), ["fit.json", "7", "upgrade"],
            [tmp / "out"])


def _artifact(tmp, make) -> tuple[Path, Path]:
    model = make("qwen2_moe")
    globe.save(quick_fit(model), tmp / "art")
    return model, tmp / "art"


def artifact_newer_format(tmp, make):
    model, art = _artifact(tmp, make)
    doc = json.loads((art / "globe_config.json").read_text())
    (art / "globe_config.json").write_text(json.dumps({**doc, "format_version": 99}))
    return (["export", str(art), "--model", str(model), "-o", str(tmp / "hf")], ["globe_config.json", "99", "upgrade"],
            [tmp / "hf"])


def artifact_for_another_model(tmp, make):
    _, art = _artifact(tmp, make)
    other = make("mixtral")
    return (["export", str(art), "--model", str(other), "-o", str(tmp / "hf")], ["mixtral", "qwen2_moe"],
            [tmp / "hf"])


def artifact_truncated(tmp, make):
    model, art = _artifact(tmp, make)
    data = (art / "banks.safetensors").read_bytes()
    (art / "banks.safetensors").write_bytes(data[:100])
    return (["export", str(art), "--model", str(model), "-o", str(tmp / "hf")], ["banks.safetensors", "corrupt"],
            [tmp / "hf"])


def export_output_not_empty(tmp, make):
    model, art = _artifact(tmp, make)
    (tmp / "hf").mkdir()
    (tmp / "hf" / "keep.txt").write_text("user data")
    return (["export", str(art), "--model", str(model), "-o", str(tmp / "hf")], ["hf", "not empty", "--overwrite"],
            [])


def eval_artifact_for_another_model(tmp, make):
    _, art = _artifact(tmp, make)
    (tmp / "t.txt").write_text("some text")
    return (["eval", str(make("olmoe")), "--globe", str(art), "--text", str(tmp / "t.txt")], ["olmoe", "qwen2_moe"],
            [])


CASES = [missing_model_dir, config_json_missing, config_json_invalid, unsupported_model_type,
         index_names_missing_shard, truncated_safetensors, garbage_safetensors, tensor_with_wrong_shape,
         tensor_with_wrong_dtype, nan_in_weights, output_is_a_file, output_under_a_file, output_not_empty,
         m_not_positive, target_support_above_m, r_above_min_p_d, budget_out_of_range, config_file_unknown_key,
         config_file_newer_format,
         artifact_newer_format, artifact_for_another_model, artifact_truncated, export_output_not_empty,
         eval_artifact_for_another_model]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_clear_line(case, tmp_path, mutable_checkpoint, capsys):
    argv, fragments, absent = case(tmp_path, mutable_checkpoint)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "model" not in str(p)}
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"globe {argv[0]}: error: ") and "\n" not in err, err
    assert "Traceback" not in captured.err and captured.out == ""
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    for path in absent:
        assert not path.exists(), f"{path} was left behind"
    for path, data in before.items():                        # the user's files are untouched
        assert path.read_bytes() == data, path


def test_unwritable_output_directory(tmp_path, mutable_checkpoint, capsys):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere: permission bits cannot make a directory unwritable")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert main(_fit(mutable_checkpoint("qwen2_moe"), out)) == 2
    finally:
        out.chmod(0o700)
    assert "not writable" in capsys.readouterr().err


def test_disk_errors_while_writing_are_one_line(tmp_path, mutable_checkpoint, monkeypatch, capsys):
    """An OSError (e.g. disk full) while the artifact is written: one line, and no half-written file."""
    import globe.formats.artifact as artifact

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "banks.safetensors"))
    monkeypatch.setattr(artifact, "save_file", full)
    assert main(_fit(mutable_checkpoint("qwen2_moe"), tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("banks.safetensors: No space left on device") and "\n" not in err
    assert not (tmp_path / "out" / "banks.safetensors").exists()
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_the_installed_command_exits_nonzero_with_one_line(tmp_path):
    """The same through a real process: exit status, a single stderr line, nothing on stdout."""
    proc = subprocess.run([sys.executable, "-m", "globe.cli.main", "fit", str(tmp_path / "nope"), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr
