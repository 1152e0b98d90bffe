"""Fault-injection battery, part 1: bad inputs and unsafe outputs through the real CLI, for every command and every
input file type. Each case damages one thing and must be refused with exit status 2, one `globe CMD: error:` line
naming the file / key / tensor at fault, no traceback, and not one byte changed, added or removed under tmp_path
(inputs, earlier outputs, no debris, no half-made output directory).

A case is a function(env) -> (argv, fragments); env is a fresh tests.reliability.battery.Env.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from globe.cli.main import main
from tests.helpers.subproc import subprocess_env
from tests.reliability.battery import Env, edit_config, edit_json, edit_safetensors, snapshot

GATE = "model.layers.0.mlp.experts.2.gate_proj.weight"


# ---- config.json of the model (info / fit / eval / calibrate / export) ----
def info_config_num_experts_string(env):
    edit_config(env.model, num_experts="four")
    return ["info", str(env.model)], ["config.json", "num_experts"]


def info_config_num_layers_list(env):
    edit_config(env.model, num_hidden_layers=[3])
    return ["info", str(env.model)], ["config.json", "num_hidden_layers"]


def info_config_hidden_size_float(env):
    edit_config(env.model, hidden_size=24.5)
    return ["info", str(env.model)], ["config.json", "hidden_size"]


def info_config_num_experts_zero(env):
    edit_config(env.model, num_experts=0)
    return ["info", str(env.model)], ["config.json", "num_experts"]


def info_config_num_experts_bool(env):
    edit_config(env.model, num_experts=True)
    return ["info", str(env.model)], ["config.json", "num_experts"]


def info_config_sparse_step_zero(env):
    edit_config(env.model, decoder_sparse_step=0)
    return ["info", str(env.model)], ["config.json", "decoder_sparse_step"]


def info_config_mlp_only_layers_string(env):
    edit_config(env.model, mlp_only_layers="1")
    return ["info", str(env.model)], ["config.json", "mlp_only_layers"]


def info_config_model_type_list(env):
    edit_config(env.model, model_type=["qwen2_moe"])
    return ["info", str(env.model)], ["config.json", "model_type"]


def info_config_not_utf8(env):
    (env.model / "config.json").write_bytes(b'{"model_type": "qwen2\xff\xfe"}')
    return ["info", str(env.model)], ["config.json"]


def fit_config_expert_size_missing(env):
    edit_config(env.model, moe_intermediate_size=None)
    return env.fit(), ["config.json", "moe_intermediate_size"]


def fit_config_top_k_string(env):
    edit_config(env.model, num_experts_per_tok="2")
    return env.fit(), ["config.json", "num_experts_per_tok"]


def eval_config_num_experts_string(env):
    edit_config(env.model, num_experts="four")
    return ["eval", str(env.model), "--text", str(env.text), "--json"], ["config.json", "num_experts"]


def eval_config_is_a_list(env):
    (env.model / "config.json").write_text("[1]")
    return env.eval(), ["config.json", "JSON object"]


def eval_config_dtype_int8(env):
    edit_config(env.model, dtype="int8", torch_dtype="int8")
    return env.eval(), ["config.json", "dtype"]


def eval_config_top_k_above_experts(env):
    edit_config(env.model, num_experts_per_tok=10)
    return env.eval(), ["config.json", "num_experts_per_tok"]


def eval_config_vocab_size_string(env):
    edit_config(env.model, vocab_size="64")
    return ["eval", str(env.model), "--text", str(env.text), "--json"], [str(env.model), "vocab_size"]


def eval_plots_history_garbage(env):
    edit_json(env.art / "globe_config.json", lambda d: d["history"].__setitem__("gate", {"am": "x"}))
    return env.eval("--plots", str(env.tmp / "plots")), ["globe_config.json", "history.gate.am"]


def calibrate_config_hidden_size_string(env):
    edit_config(env.model, hidden_size="24")
    return env.calibrate(), ["config.json", "hidden_size"]


def export_config_num_layers_negative(env):
    edit_config(env.model, num_hidden_layers=-1)
    return env.export(), ["config.json", "num_hidden_layers"]


# ---- safetensors shards and index ----
def info_index_weight_map_list(env):
    (env.model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    return ["info", str(env.model)], ["model.safetensors.index.json", "weight_map"]


def info_index_not_utf8(env):
    (env.model / "model.safetensors.index.json").write_bytes(b"\xff\xfe{}")
    return ["info", str(env.model)], ["model.safetensors.index.json"]


def info_shard_header_too_long(env):
    data = (env.model / "model.safetensors").read_bytes()
    (env.model / "model.safetensors").write_bytes((2 ** 40).to_bytes(8, "little") + data[8:])
    return ["info", str(env.model)], ["model.safetensors"]


def info_shard_empty_file(env):
    (env.model / "model.safetensors").write_bytes(b"")
    return ["info", str(env.model)], ["model.safetensors"]


def fit_shard_header_not_json(env):
    data = (env.model / "model.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    (env.model / "model.safetensors").write_bytes(data[:8] + b"{" * size + data[8 + size:])
    return env.fit(), ["model.safetensors"]


def fit_bin_only_model(env):
    (env.model / "model.safetensors").rename(env.model / "pytorch_model.bin")
    return env.fit(), [str(env.model), ".bin", "safetensors"]


def eval_bin_only_model(env):
    (env.model / "model.safetensors").rename(env.model / "pytorch_model.bin")
    return ["eval", str(env.model), "--text", str(env.text), "--json"], [str(env.model), ".bin", "safetensors"]


def calibrate_bin_only_model(env):
    (env.model / "model.safetensors").rename(env.model / "pytorch_model.bin")
    return env.calibrate(), [str(env.model), ".bin", "safetensors"]


def export_bin_only_model(env):
    (env.model / "model.safetensors").rename(env.model / "pytorch_model.bin")
    return env.export(None, "--dense"), [str(env.model), ".bin", "safetensors"]


def eval_weights_nan(env):
    def poison(t):
        t["model.embed_tokens.weight"][3, 0] = float("nan")
    edit_safetensors(env.model / "model.safetensors", poison)
    return ["eval", str(env.model), "--text", str(env.text), "--json"], ["model.embed_tokens.weight", "NaN"]


def export_weights_of_other_model_same_shapes(env, tiny_checkpoint=None):
    from tests.helpers.tiny_models import make_tiny_checkpoint
    make_tiny_checkpoint("qwen2_moe", env.tmp / "other", seed=7)
    (env.model / "model.safetensors").unlink()
    (env.tmp / "other" / "model.safetensors").rename(env.model / "model.safetensors")
    for p in sorted((env.tmp / "other").iterdir()):
        p.unlink()
    (env.tmp / "other").rmdir()
    return env.export(), ["other weights", str(env.model), "--force"]


def eval_weights_of_other_model_same_shapes(env):
    argv, fragments = export_weights_of_other_model_same_shapes(env)
    return env.eval(), fragments


# ---- --config files (fit) ----
def _fit_with_config(env, name: str, text: str | bytes):
    path = env.tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return env.fit(None, "--config", str(path))


def fit_config_file_m_string(env):
    return _fit_with_config(env, "fit.yaml", "bank:\n  m: eight\n"), ["fit.yaml", "bank.m"]


def fit_config_file_section_list(env):
    return _fit_with_config(env, "fit.json", json.dumps({"bank": [1, 2]})), ["fit.json", "bank"]


def fit_config_file_top_level_list(env):
    return _fit_with_config(env, "fit.yaml", "- 1\n- 2\n"), ["fit.yaml"]


def fit_config_file_missing(env):
    return env.fit(None, "--config", str(env.tmp / "nope.yaml")), ["nope.yaml"]


def fit_config_file_not_utf8(env):
    return _fit_with_config(env, "fit.yaml", b"bank:\n  m: \xff\xfe\n"), ["fit.yaml"]


def fit_config_file_float_iterations(env):
    return _fit_with_config(env, "fit.yaml", "train:\n  am_iters: 2.5\n"), ["fit.yaml", "am_iters"]


def fit_config_file_bool_as_string(env):
    return _fit_with_config(env, "fit.yaml", "train:\n  grad_checkpoint: 'yes'\n"), ["fit.yaml", "grad_checkpoint"]


def fit_config_file_format_version_string(env):
    return _fit_with_config(env, "fit.json", json.dumps({"format_version": "one"})), ["fit.json", "format_version"]


def fit_config_file_section_null(env):
    return _fit_with_config(env, "fit.json", json.dumps({"train": None})), ["fit.json", "train"]


def fit_config_file_stats_number(env):
    return _fit_with_config(env, "fit.yaml", "activation:\n  stats: 5\n"), ["fit.yaml", "activation.stats"]


def fit_config_file_nan_eta(env):
    return _fit_with_config(env, "fit.yaml", "sparsity:\n  eta: .nan\n"), ["fit.yaml", "sparsity.eta"]


# ---- command-line bounds (fit / calibrate / eval) ----
def fit_m_absurd(env):
    return env.fit(None, "--m", "100000000"), ["bank.m", "100000000"]


def fit_seed_above_64_bits(env):
    return env.fit(None, "--seed", str(2 ** 70)), ["seed"]


def fit_seed_negative(env):
    return env.fit(None, "--seed", "-1"), ["seed"]


def fit_r_negative(env):
    return env.fit(None, "--r", "-3"), ["bank.r"]


def fit_budget_nan(env):
    return ["fit", str(env.model), "-o", str(env.tmp / "out"), "--budget", "nan"], ["bank.budget"]


def fit_checkpoint_every_negative(env):
    return env.fit(None, "--checkpoint-every", "-1"), ["checkpoint_every"]


def calibrate_window_zero(env):
    return env.calibrate(None, "--window", "0"), ["--window"]


def calibrate_max_tokens_negative(env):
    return env.calibrate(None, "--max-tokens", "-5"), ["--max-tokens"]


def eval_max_length_zero(env):
    return env.eval("--max-length", "0"), ["--max-length"]


# ---- --text files (eval / bench / calibrate) ----
def eval_text_not_utf8(env):
    env.text.write_bytes(b"caf\xe9 au lait " * 20)
    return env.eval(), [str(env.text), "UTF-8"]


def eval_text_empty(env):
    env.text.write_text("")
    return env.eval(), [str(env.text), "empty"]


def bench_text_not_utf8(env):
    env.text.write_bytes(b"\xff" * 64)
    return env.bench(), [str(env.text), "UTF-8"]


def calibrate_text_not_utf8(env):
    env.text.write_bytes(b"caf\xe9 au lait " * 20)
    return env.calibrate(), [str(env.text), "UTF-8"]


def calibrate_text_empty(env):
    env.text.write_text("")
    return env.calibrate(), [str(env.text), "empty"]


def calibrate_text_one_char(env):
    env.text.write_text("a")
    return env.calibrate(), [str(env.text)]


# ---- outputs: never overwrite, never inside an input, one run at a time ----
def calibrate_out_is_the_model_weights(env):
    return env.calibrate(env.model / "model.safetensors"), ["model.safetensors", "input"]


def calibrate_out_inside_model_dir(env):
    return env.calibrate(env.model / "stats.safetensors"), [str(env.model), "input"]


def calibrate_out_exists(env):
    (env.tmp / "stats.safetensors").write_bytes(b"user data")
    return env.calibrate(), ["stats.safetensors", "--overwrite"]


def calibrate_out_is_the_text(env):
    return env.calibrate(env.text, "--overwrite"), [str(env.text), "input"]


def fit_out_inside_model_dir(env):
    return env.fit(env.model / "out"), [str(env.model), "input"]


def fit_out_is_model_dir_even_with_overwrite(env):
    return env.fit(env.model, "--overwrite"), [str(env.model), "input"]


def fit_resume_over_finished_artifact(env):
    return env.fit(env.art, "--m", "5", "--resume"), [str(env.art), "--resume"]


def fit_metrics_into_model_weights(env):
    return env.fit(None, "--metrics", str(env.model / "model.safetensors")), ["model.safetensors", "input"]


def fit_metrics_is_a_directory(env):
    (env.tmp / "metrics").mkdir()
    return env.fit(None, "--metrics", str(env.tmp / "metrics")), ["metrics", "directory"]


def export_max_shard_size_garbage(env):
    return env.export(None, "--dense", "--max-shard-size", "1.5 gigs"), ["--max-shard-size", "1.5 gigs"]


def export_device_unavailable(env):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return env.export(None, "--device", "cuda"), ["cuda"]


def fit_device_unavailable(env):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return env.fit(None, "--device", "cuda"), ["cuda"]


def eval_tokenizer_garbage(env):
    (env.tmp / "tok").mkdir()
    (env.tmp / "tok" / "tokenizer.json").write_text("{not json")
    (env.tmp / "tok" / "tokenizer_config.json").write_text("{}")
    return env.eval("--tokenizer", str(env.tmp / "tok")), ["tokenizer", str(env.tmp / "tok")]


def fit_output_locked_by_live_run(env):
    out = env.tmp / "out"
    out.mkdir()
    return env.fit(out), ["in use", "pid"]


def export_out_is_model_dir_even_with_overwrite(env):
    return env.export(env.model, "--dense", "--overwrite"), [str(env.model), "input"]


def export_out_is_the_artifact(env):
    return env.export(env.art, "--overwrite"), [str(env.art), "input"]


def export_out_inside_model_dir(env):
    return env.export(env.model / "hf"), [str(env.model), "input"]


def export_out_holds_previous_export(env):
    (env.tmp / "hf").mkdir()
    (env.tmp / "hf" / "config.json").write_text("{}")
    return env.export(None, "--dense"), ["hf", "--overwrite"]


def bench_out_exists(env):
    (env.tmp / "bench.json").write_text("{}")
    return env.bench("-o", str(env.tmp / "bench.json")), ["bench.json", "--overwrite"]


def bench_out_is_model_config(env):
    return env.bench("-o", str(env.model / "config.json"), "--overwrite"), ["config.json", "input"]


# ---- compress (fit + export in one run) ----
def _compress(env, out=None, *extra):
    return ["compress", str(env.model), "-o", str(out or env.tmp / "c"), *QUICK_COMPRESS, *extra]


QUICK_COMPRESS = ["--m", "4", "--r", "4", "--target-support", "2", "--am-iters", "2", "--varpro-steps", "3"]


def compress_out_is_model_dir_even_with_overwrite(env):
    return _compress(env, env.model, "--overwrite"), [str(env.model), "input"]


def compress_out_holds_files(env):
    (env.tmp / "c").mkdir()
    (env.tmp / "c" / "notes.txt").write_text("mine")
    return _compress(env), ["not empty", "--overwrite"]


def compress_calibration_text_not_utf8(env):
    env.text.write_bytes(b"\xff\xfe" * 40)
    return _compress(env, None, "--calibration-text", str(env.text)), [str(env.text), "UTF-8"]


def compress_seed_above_64_bits(env):
    return _compress(env, None, "--seed", str(2 ** 70)), ["seed"]


def compress_dense_out_inside_model(env):
    return _compress(env, None, "--dense", "--dense-out", str(env.model / "dense")), [str(env.model), "input"]


def compress_config_num_experts_string(env):
    edit_config(env.model, num_experts="four")
    return _compress(env), ["config.json", "num_experts"]


# ---- the artifact: banks.safetensors ----
def _banks(env, edit):
    edit_safetensors(env.art / "banks.safetensors", edit)


def export_bank_nan(env):
    _banks(env, lambda t: t["gate.bank"].view(-1).__setitem__(5, float("nan")))
    return env.export(None, "--dense"), ["banks.safetensors", "gate.bank"]


def eval_adapters_inf(env):
    _banks(env, lambda t: t["up.adapters"].view(-1).__setitem__(0, float("inf")))
    return env.eval(), ["banks.safetensors", "up.adapters"]


def export_scales_nan(env):
    _banks(env, lambda t: t["gate.scales"].__setitem__(0, float("nan")))
    return env.export(), ["banks.safetensors", "gate.scales"]


def export_code_values_nan(env):
    _banks(env, lambda t: t["up.codes.values"].__setitem__(0, float("nan")))
    return env.export(), ["banks.safetensors", "up.codes.values"]


def export_code_index_negative(env):
    _banks(env, lambda t: t["gate.codes.indices"].__setitem__(0, -1))
    return env.export(None, "--dense"), ["banks.safetensors", "gate.codes.indices"]


def eval_code_index_too_large(env):
    _banks(env, lambda t: t["gate.codes.indices"].__setitem__(0, 4))
    return env.eval(), ["banks.safetensors", "gate.codes.indices"]


def export_bank_int8(env):
    _banks(env, lambda t: t.__setitem__("gate.bank", t["gate.bank"].to(torch.int8)))
    return env.export(), ["banks.safetensors", "gate.bank", "int8"]


def export_indices_float(env):
    _banks(env, lambda t: t.__setitem__("gate.codes.indices", t["gate.codes.indices"].float()))
    return env.export(), ["banks.safetensors", "gate.codes.indices"]


def export_indptr_decreasing(env):
    def edit(t):
        t["gate.codes.indptr"][1], t["gate.codes.indptr"][2] = t["gate.codes.indptr"][2].item(), 0
    _banks(env, edit)
    return env.export(), ["banks.safetensors", "gate.codes.indptr"]


def bench_ids_negative(env):
    _banks(env, lambda t: t["up.ids"].__setitem__((0, 1), -1))
    return env.bench(), ["banks.safetensors", "up.ids"]


# ---- the artifact: globe_config.json ----
def _doc(env, edit):
    edit_json(env.art / "globe_config.json", edit)


def export_globe_config_m_string(env):
    _doc(env, lambda d: d["families"]["gate"].__setitem__("m", "4"))
    return env.export(), ["globe_config.json", "families.gate.m"]


def export_globe_config_families_list(env):
    _doc(env, lambda d: d.__setitem__("families", ["gate", "up"]))
    return env.export(), ["globe_config.json", "families"]


def export_globe_config_families_missing(env):
    _doc(env, lambda d: d.pop("families") and None)
    return env.export(), ["globe_config.json", "families"]


def export_globe_config_fit_config_bad(env):
    _doc(env, lambda d: d["config"]["bank"].__setitem__("m", "x"))
    return env.export(), ["globe_config.json", "bank.m"]


def eval_globe_config_format_version_string(env):
    _doc(env, lambda d: d.__setitem__("format_version", "one"))
    return env.eval(), ["globe_config.json", "format_version"]


def export_globe_config_not_an_object(env):
    _doc(env, lambda d: [d])
    return env.export(), ["globe_config.json"]


def export_globe_config_not_utf8(env):
    (env.art / "globe_config.json").write_bytes(b'{"format_version": 1, "x": "\xff"}')
    return env.export(), ["globe_config.json"]


def export_globe_config_source_list(env):
    _doc(env, lambda d: d.__setitem__("source", ["model"]))
    return env.export(), ["globe_config.json", "source"]


def eval_globe_config_metrics_list(env):
    _doc(env, lambda d: d.__setitem__("metrics", []))
    return env.eval(), ["globe_config.json", "metrics"]


def export_globe_config_phi_unknown(env):
    _doc(env, lambda d: d["families"]["gate"].__setitem__("phi", "relu"))
    return env.export(), ["globe_config.json", "phi"]


def export_globe_config_model_dir_number(env):
    _doc(env, lambda d: d["source"].__setitem__("model_dir", 5))
    return ["export", str(env.art), "-o", str(env.tmp / "hf")], ["globe_config.json", "model_dir"]


# ---- calibration statistics (fit --calibration) ----
def _stats(env, **tensors):
    base = {"layers": torch.tensor([0, 2]), "hidden.sum": torch.eye(24).expand(2, 24, 24).contiguous(),
            "routed.counts": torch.ones(2, 4, dtype=torch.int64), "routed.weight_sums": torch.ones(2, 4)}
    base.update(tensors)
    meta = {"format_version": "1", "kind": "globe-activation-stats", "info": json.dumps({"tokens": 64})}
    path = env.tmp / "stats.safetensors"
    save_file({k: v for k, v in base.items() if v is not None}, str(path), metadata=meta)
    return path


def fit_stats_wrong_hidden_size(env):
    path = _stats(env, **{"hidden.sum": torch.eye(10).expand(2, 10, 10).contiguous()})
    return env.fit(None, "--calibration", str(path)), ["stats.safetensors", "hidden.sum"]


def fit_stats_nan(env):
    hidden = torch.eye(24).expand(2, 24, 24).clone()
    hidden[0, 0, 0] = float("nan")
    path = _stats(env, **{"hidden.sum": hidden})
    return env.fit(None, "--calibration", str(path)), ["stats.safetensors", "hidden.sum"]


def fit_stats_wrong_layers(env):
    path = _stats(env, layers=torch.tensor([5, 6]))
    return env.fit(None, "--calibration", str(path)), ["stats.safetensors", "layers"]


def fit_stats_negative_counts(env):
    path = _stats(env, **{"routed.counts": -torch.ones(2, 4, dtype=torch.int64)})
    return env.fit(None, "--calibration", str(path)), ["stats.safetensors", "routed.counts"]


def fit_stats_wrong_expert_count(env):
    path = _stats(env, **{"hidden.expert_sum": torch.eye(24).expand(2, 3, 24, 24).contiguous()})
    return env.fit(None, "--calibration", str(path)), ["stats.safetensors", "hidden.expert_sum"]


def fit_stats_info_not_json(env):
    path = _stats(env)
    edit_safetensors(path, lambda t: None)
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"format_version": "1", "kind": "globe-activation-stats", "info": "{"})
    return env.fit(None, "--calibration", str(path)), ["stats.safetensors", "info"]


def fit_stats_format_version_garbage(env):
    path = _stats(env)
    from safetensors.torch import load_file
    save_file(load_file(str(path)), str(path), metadata={"format_version": "v2", "kind": "globe-activation-stats"})
    return env.fit(None, "--calibration", str(path)), ["stats.safetensors", "format_version"]


# ---- compressed checkpoints (eval) ----
def _compressed(env):
    from globe.export import save_compressed
    out = env.tmp / "compressed"
    save_compressed(env.model, env.art, out)
    return out


def eval_compressed_quantization_config_not_an_object(env):
    out = _compressed(env)
    edit_json(out / "config.json", lambda d: d.__setitem__("quantization_config", ["globe"]))
    return ["eval", str(out), "--text", str(env.text), "--no-speed"], ["config.json", "quantization_config"]


def eval_compressed_bank_nan(env):
    out = _compressed(env)

    def poison(t):
        key = next(k for k in sorted(t) if "bank" in k and t[k].is_floating_point())
        t[key].view(-1)[0] = float("nan")
    edit_safetensors(out / "model.safetensors", poison)
    return ["eval", str(out), "--text", str(env.text), "--no-speed"], ["model.safetensors", "NaN"]


CASES = [v for k, v in dict(globals()).items() if callable(v) and k.split("_")[0] in
         ("info", "fit", "eval", "calibrate", "export", "bench", "compress") and getattr(v, "__module__", "") == __name__]


class _LiveHolder:
    """A real process holding the lock of a directory (as a concurrent `globe fit` would)."""

    def __init__(self, out):
        code = ("import fcntl, json, os, socket, sys, time\n"
                "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "start = open(f'/proc/{os.getpid()}/stat').read().rsplit(')', 1)[1].split()[19]\n"
                "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'start': int(start),"
                " 'time': time.time(), 'command': 'fit'}).encode())\n"
                "print('locked', flush=True)\n"
                "time.sleep(60)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(out / ".globe.lock")], stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_refused_with_one_line_and_nothing_touched(case, tmp_path, tiny_checkpoint, capsys):
    env = Env.build(tmp_path, tiny_checkpoint)
    argv, fragments = case(env)
    holder = _LiveHolder(tmp_path / "out") if case is fit_output_locked_by_live_run else None
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main(["--log-level", "ERROR", *argv])
    finally:
        if holder is not None:
            holder.stop()
    captured = capsys.readouterr()
    lines = [line for line in captured.err.replace("\r", "\n").splitlines() if line.strip()]
    err = lines[-1] if lines else ""
    assert code == 2, captured.err
    assert "Traceback" not in captured.err and err.startswith(f"globe {argv[0]}: error: "), captured.err
    assert sum(" error: " in line for line in lines) == 1, captured.err      # progress bars aside, one line
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    after = snapshot(tmp_path)
    if holder is not None:                                   # the holder's own lock file is its business
        before.pop("out/.globe.lock", None), after.pop("out/.globe.lock", None)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


def test_the_battery_is_broad():
    commands = {c.__name__.split("_")[0] for c in CASES}
    assert len(CASES) >= 60 and commands == {"info", "fit", "eval", "calibrate", "export", "bench", "compress"}


@pytest.mark.slow
@pytest.mark.parametrize("case", [fit_config_file_m_string, calibrate_out_is_the_model_weights, export_bank_nan,
                                  eval_text_not_utf8], ids=lambda c: c.__name__)
def test_a_real_process_exits_2_with_one_line(case, tmp_path, tiny_checkpoint):
    env = Env.build(tmp_path, tiny_checkpoint)
    argv, fragments = case(env)
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "globe.cli.main", *argv], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)
    lines = [line for line in proc.stderr.splitlines() if " error: " in line or "Traceback" in line]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1 and all(f in lines[0] for f in fragments), proc.stderr
    assert snapshot(tmp_path) == before
