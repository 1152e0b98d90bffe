"""Round three, class 5: every output of every command follows globe.core.outputs. An output is never an input of
the same command (even with --overwrite), never replaces an existing file or directory without --overwrite (an
append-only metrics log is appended to only when it is one), two outputs of one command never share a path, and
what is written lands in one rename (old or new, never torn).

Refusals: a case is function(env) -> (argv, fragments); the run must exit 2 with one `globe CMD: error:` line that
names each fragment (the flag first), no traceback, and not one byte under tmp_path changed.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from globe.cli.main import main
from globe.eval.plots import PLOT_FILES
from globe.formats.stats import STATS_KIND
from tests.reliability.battery import CALIB, EVAL, QUICK, Env, snapshot
from tests.reliability.round3 import Round3, assert_refused

USER = "my notes, not globe's\n"
SWEEP = ["--budgets", "0.5", "--inits", "svd", "--am-iters", "1", "--varpro-steps", "1"]


def _user_file(env: Env, name: str = "notes.txt") -> str:
    path = env.tmp / name
    path.write_text(USER)
    return str(path)


def _user_dir(env: Env, name: str) -> str:
    (env.tmp / name).mkdir()
    (env.tmp / name / "keep.txt").write_text(USER)
    return str(env.tmp / name)


def _compress(env: Env, *extra: str) -> list[str]:
    return ["compress", str(env.model), "-o", str(env.tmp / "comp"), *QUICK, "--no-calibration", *extra]


def _config_file(env: Env) -> str:
    path = env.tmp / "fit.json"
    path.write_text(json.dumps({"bank": {"m": 4, "r": 4}}))
    return str(path)


# ---- an output is never an input of the same command, even with --overwrite ----
def fit_metrics_is_the_model_config(env):
    return env.fit(None, "--metrics", str(env.model / "config.json"), "--overwrite"), ["--metrics", "input"]


def fit_metrics_is_the_config_file(env):
    config = _config_file(env)
    return env.fit(None, "--config", config, "--metrics", config, "--overwrite"), ["--metrics", "input"]


def fit_out_is_the_calibration_stats(env):
    stats = str(env.tmp / "stats.safetensors")              # a readable safetensors file: the input checks pass it
    save_file({"user": torch.ones(2)}, stats, metadata={"kind": STATS_KIND})
    return env.fit(env.tmp / "stats.safetensors", "--calibration", stats, "--overwrite"), ["-o", "input"]


def compress_metrics_is_the_calibration_text(env):
    return (["compress", str(env.model), "-o", str(env.tmp / "comp"), *QUICK, "--calibration-text", str(env.text),
             "--metrics", str(env.text), "--overwrite"], ["--metrics", "input"])


def compress_metrics_is_the_eval_text(env):
    return _compress(env, "--text", str(env.text), "--metrics", str(env.text), "--overwrite"), ["--metrics", "input"]


def compress_out_is_the_calibration_text(env):
    return (["compress", str(env.model), "-o", str(env.text), *QUICK, "--calibration-text", str(env.text),
             "--overwrite"], ["-o", "input"])


def compress_dense_out_is_the_model(env):
    return _compress(env, "--dense", "--dense-out", str(env.model), "--overwrite"), ["--dense-out", "input"]


def eval_metrics_is_the_text(env):
    return env.eval("--metrics", str(env.text)), ["--metrics", "input"]


def eval_metrics_is_the_model_config(env):
    return env.eval("--metrics", str(env.model / "config.json")), ["--metrics", "input"]


def eval_metrics_is_the_sweep(env):
    sweep = str(env.tmp / "sweep.json")                     # valid JSON: the input checks pass it
    (env.tmp / "sweep.json").write_text('{"user": 1}')
    return env.eval("--plots", str(env.tmp / "plots"), "--sweep", sweep, "--metrics", sweep), ["--metrics", "input"]


def eval_plots_inside_the_artifact(env):
    return env.eval("--plots", str(env.art), "--overwrite"), ["--plots", "input"]


def bench_out_is_the_calib_text(env):
    calib = _user_file(env, "calib.txt")
    return env.bench("--calib", calib, "-o", calib, "--overwrite"), ["-o", "input"]


def bench_metrics_is_the_text(env):
    return env.bench("--metrics", str(env.text)), ["--metrics", "input"]


def calibrate_out_is_the_tokenizer_file(env):
    return env.calibrate(env.model / "tokenizer.json", "--overwrite"), ["-o", "input"]


def sweep_out_is_the_model_config(env):
    return ["sweep", str(env.model), "-o", str(env.model / "config.json"), *SWEEP, "--overwrite"], ["-o", "input"]


def export_out_inside_the_artifact(env):
    return env.export(env.art / "hf", "--overwrite"), ["-o", "input"]


# ---- an existing file or directory is replaced only with --overwrite ----
def fit_metrics_user_file(env):
    return env.fit(None, "--metrics", _user_file(env)), ["--metrics", "notes.txt", "--overwrite"]


def fit_metrics_earlier_log_without_resume(env):
    log = env.tmp / "fit.jsonl"
    log.write_text('{"time": 1, "event": "am_iter"}\n')
    return env.fit(None, "--metrics", str(log)), ["--metrics", "fit.jsonl", "--overwrite"]


def fit_out_user_directory(env):
    _user_dir(env, "mine")
    return env.fit(env.tmp / "mine"), ["mine", "--overwrite"]


def compress_metrics_user_file(env):
    return _compress(env, "--metrics", _user_file(env)), ["--metrics", "notes.txt", "--overwrite"]


def compress_dense_out_user_directory(env):
    return _compress(env, "--dense", "--dense-out", _user_dir(env, "dense")), ["--dense-out", "dense", "--overwrite"]


def compress_out_user_directory(env):
    _user_dir(env, "comp")
    return _compress(env), ["comp", "--overwrite"]


def eval_metrics_user_file(env):
    return env.eval("--metrics", _user_file(env)), ["--metrics", "notes.txt", "metrics log"]


def eval_plots_over_earlier_plots(env):
    plots = _user_dir(env, "plots")
    (env.tmp / "plots" / PLOT_FILES[1]).write_bytes(b"an earlier plot")
    return env.eval("--plots", plots), ["--plots", PLOT_FILES[1], "--overwrite"]


def eval_plots_is_a_file(env):
    return env.eval("--plots", _user_file(env), "--overwrite"), ["--plots", "notes.txt", "not a directory"]


def bench_metrics_user_file(env):
    return env.bench("--metrics", _user_file(env)), ["--metrics", "notes.txt"]


def bench_out_user_file(env):
    return env.bench("-o", _user_file(env, "bench.json")), ["-o", "bench.json", "--overwrite"]


def calibrate_out_user_file(env):
    return env.calibrate(_user_file(env, "stats.safetensors")), ["-o", "stats.safetensors", "--overwrite"]


def sweep_out_user_file(env):
    return ["sweep", str(env.model), "-o", _user_file(env, "sweep.json"), *SWEEP], ["-o", "sweep.json", "--overwrite"]


def export_out_user_directory(env):
    _user_dir(env, "hf")
    return env.export(env.tmp / "hf", "--dense"), ["hf", "--overwrite"]


def compress_out_kept_when_the_text_is_bad(env):
    """The issue's example: a bad --text was noticed after the fit and export, which then replaced OUT."""
    _user_dir(env, "comp")
    (env.tmp / "bad.txt").write_bytes(b"\xff\xfe not UTF-8")
    return _compress(env, "--text", str(env.tmp / "bad.txt"), "--overwrite"), ["--text", "bad.txt"]


# ---- two outputs of one command never share a path ----
def bench_out_and_metrics_the_same(env):
    same = str(env.tmp / "bench.json")
    return env.bench("-o", same, "--metrics", same, "--overwrite"), ["-o", "--metrics"]


def compress_dense_out_is_out(env):
    return _compress(env, "--dense", "--dense-out", str(env.tmp / "comp")), ["-o", "--dense-out"]


def compress_metrics_inside_out(env):
    return _compress(env, "--metrics", str(env.tmp / "comp" / "fit.jsonl")), ["-o", "--metrics"]


def compress_out_inside_dense_out(env):
    return (["compress", str(env.model), "-o", str(env.tmp / "dense" / "comp"), *QUICK, "--no-calibration",
             "--dense", "--dense-out", str(env.tmp / "dense")], ["-o", "--dense-out"])


def eval_plots_and_metrics_the_same(env):
    same = str(env.tmp / "report")
    return env.eval("--plots", same, "--metrics", same), ["--plots", "--metrics"]


CASES = [v for k, v in dict(globals()).items() if callable(v) and getattr(v, "__module__", "") == __name__ and
         k.split("_")[0] in ("fit", "compress", "eval", "bench", "calibrate", "sweep", "export")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_an_output_is_refused_with_one_line_and_nothing_touched(case, tmp_path, tiny_checkpoint, capsys):
    env = Env.build(tmp_path, tiny_checkpoint)
    argv, fragments = case(env)
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = main(["--log-level", "ERROR", *argv])
    err = capsys.readouterr().err
    assert_refused(code, err, *fragments)
    assert snapshot(tmp_path) == before


def test_every_output_option_is_in_the_battery():
    """Each output flag of each command has a case of each kind that applies to it."""
    names = {c.__name__ for c in CASES}
    for command, flags in {"fit": ("out", "metrics"), "compress": ("out", "metrics", "dense_out"),
                           "eval": ("metrics", "plots"), "bench": ("out", "metrics"), "calibrate": ("out",),
                           "sweep": ("out",), "export": ("out",)}.items():
        for flag in flags:
            mine = [n for n in names if n.startswith(f"{command}_{flag}_")]
            assert any("_is_" in n or "inside" in n for n in mine), (command, flag)            # never an input
            assert any("user" in n or "earlier" in n or "is_a_file" in n for n in mine), (command, flag)


def test_bench_json_never_an_input_nor_replaced(tmp_path, round3_base, capsys):
    env = Round3.build(tmp_path, round3_base)
    bench = ["bench", str(env.comp), "--modes", "factored", "--text", str(env.text), *EVAL, "--no-original"]
    before = snapshot(env.tmp)
    code, err = env.cli(capsys, *bench, "-o", str(env.text), "--overwrite")
    assert_refused(code, err, str(env.text), "input")
    (tmp_path / "mine.json").write_text("{}")
    before = snapshot(env.tmp)
    code, err = env.cli(capsys, *bench, "-o", str(tmp_path / "mine.json"))
    assert_refused(code, err, "mine.json", "--overwrite")
    assert snapshot(env.tmp) == before


# ---- what is written: replaced in one rename (a new inode), appended only to a metrics log, nothing left over ----
def _debris(root) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.endswith(".tmp") or "globe-staging" in p.name]


def test_a_dry_run_writes_nothing_whatever_its_outputs(tmp_path, tiny_checkpoint, capsys):
    env = Env.build(tmp_path, tiny_checkpoint)
    notes, mine = _user_file(env), _user_dir(env, "mine")
    before = snapshot(tmp_path)
    for argv in (env.fit(env.tmp / "mine", "--dry-run", "--metrics", notes),
                 ["compress", str(env.model), "-o", mine, *QUICK, "--dry-run", "--metrics", notes, "--dense",
                  "--dense-out", mine]):
        assert main(["--log-level", "ERROR", *argv]) == 0
        assert snapshot(tmp_path) == before


def test_metrics_replaced_with_overwrite_and_appended_only_to_a_log(tmp_path, tiny_checkpoint, capsys):
    env = Env.build(tmp_path, tiny_checkpoint)
    log = env.tmp / "fit.jsonl"
    log.write_text(USER)
    inode = os.stat(log).st_ino
    assert main(["--log-level", "ERROR", *env.fit(None, "--metrics", str(log), "--overwrite")]) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert USER not in log.read_text() and {"am_iter", "family_done"} <= {r["event"] for r in records}
    assert os.stat(log).st_ino != inode                       # replaced by a rename, not rewritten in place
    before = log.read_text()
    assert main(["--log-level", "ERROR", *env.eval("--metrics", str(log))]) == 0
    after = log.read_text()
    assert after.startswith(before) and json.loads(after[len(before):].splitlines()[0])["event"] == "eval"
    assert _debris(tmp_path) == []


def test_plots_replaced_file_by_file_in_one_rename_each(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    env = Env.build(tmp_path, tiny_checkpoint)
    plots = env.tmp / "plots"
    assert main(["--log-level", "ERROR", *env.eval("--plots", str(plots), "--no-kl")]) == 0
    first = snapshot(plots)
    assert set(first) <= set(PLOT_FILES) and len(first) >= 3
    renames = []

    def failing_replace(src, dst):                  # the disk fills up at the third rename of the batch
        renames.append(dst)
        if len(renames) == 3:
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)
    real = os.replace
    (plots / PLOT_FILES[1]).write_bytes(b"old")
    old = snapshot(plots)
    monkeypatch.setattr(os, "replace", failing_replace)
    code = main(["--log-level", "ERROR", *env.eval("--plots", str(plots), "--no-kl", "--overwrite")])
    monkeypatch.setattr(os, "replace", real)
    assert code == 2
    now = snapshot(plots)
    assert set(now) == set(old) and all(now[k] in (old[k], first[k]) for k in now)   # each file old or new
    assert now[PLOT_FILES[1]] == first[PLOT_FILES[1]]     # the first renames went through, the third did not,
    assert _debris(tmp_path) == []                        # and no temporary file is left
    assert main(["--log-level", "ERROR", *env.eval("--plots", str(plots), "--no-kl", "--overwrite")]) == 0
    assert set(snapshot(plots)) == set(first)


@pytest.mark.parametrize("command", ["calibrate", "sweep", "bench", "fit-metrics", "eval-metrics"])
def test_a_write_that_fails_at_its_rename_keeps_the_old_file(command, tmp_path, tiny_checkpoint, capsys,
                                                            monkeypatch, bench_in_process):
    """The last step of every file output is one rename; when it fails, the old file is intact and nothing is
    left beside it."""
    env = Env.build(tmp_path, tiny_checkpoint)
    target = env.tmp / ("out.jsonl" if "metrics" in command else "out.bin")
    target.write_text('{"time": 0, "event": "old"}\n')
    argv = {"calibrate": env.calibrate(target, "--overwrite"),
            "sweep": ["sweep", str(env.model), "-o", str(target), *SWEEP, "--overwrite"],
            "bench": env.bench("-o", str(target), "--overwrite"),
            "fit-metrics": env.fit(None, "--metrics", str(target), "--overwrite"),
            "eval-metrics": env.eval("--metrics", str(target))}[command]
    old = snapshot(tmp_path)[target.name]
    real = os.replace

    def failing_replace(src, dst, *a, **k):
        if os.fspath(dst) == str(target):
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", failing_replace)
    try:
        main(["--log-level", "ERROR", *argv])
    except OSError:
        pass                                        # a sink's close may raise after the command's own outcome
    monkeypatch.setattr(os, "replace", real)
    assert snapshot(tmp_path)[target.name] == old
    assert [name for name in _debris(tmp_path) if target.name in name] == []
