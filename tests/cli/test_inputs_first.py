"""Inputs before work, for every command: a missing / empty / non-UTF-8 file, a directory of the wrong kind or an
out-of-range number is refused with exit 2 and one line naming the option as typed, with no traceback, nothing
written, and before the command's run (which each case replaces by a tripwire) loads, fits or writes anything."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest

import globe
import globe.cli.main as cli
from globe.cli import inputs
from globe.export import save_compressed
from tests.helpers.fits import char_tokenizer, quick_fit
from tests.helpers.subproc import subprocess_env

COMMANDS = ("info", "calibrate", "fit", "compress", "export", "eval", "bench", "sweep")
PATHLIKE = {"FILE", "DIR", "STATS", "JSON", "OUT", "HF_DIR", "MODEL_DIR", "ARTIFACT"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("inputs")
    model = tmp / "model"
    shutil.copytree(tiny_checkpoint("qwen2_moe"), model)
    char_tokenizer(model)
    fit = quick_fit(model)
    globe.save(fit, tmp / "art")
    save_compressed(model, fit, tmp / "compressed")
    (tmp / "good.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 4)
    (tmp / "empty.txt").write_text("")
    (tmp / "blank.txt").write_text("  \n\n")
    (tmp / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 4)
    (tmp / "not.json").write_text("{not json")
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "emptydir").mkdir()
    return {k: str(v) for k, v in {"model": model, "art": tmp / "art", "compressed": tmp / "compressed",
                                   "good": tmp / "good.txt", "empty": tmp / "empty.txt", "blank": tmp / "blank.txt",
                                   "latin1": tmp / "latin1.txt", "missing": tmp / "nowhere" / "x",
                                   "emptydir": tmp / "emptydir", "notjson": tmp / "not.json",
                                   "listjson": tmp / "list.json", "tmp": tmp}.items()}


@pytest.fixture
def tripwire(monkeypatch):
    """Every command's run raises if reached: a refusal must come before it."""
    import importlib
    for name in COMMANDS:
        module = importlib.import_module(f"globe.cli.{name}")

        def reached(args, _name=name):
            raise AssertionError(f"globe {_name} reached its run: the input was not checked first")
        monkeypatch.setattr(module, "run", reached)


def _tree(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files + _}


def refused(world, capsys, argv: list[str], flag: str) -> str:
    before = _tree(world["tmp"])
    try:
        code = cli.main(argv)
    except SystemExit as exc:                                    # argparse's own refusals (invalid int, choice)
        code = exc.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, err)
    assert len(lines) == 1 and "Traceback" not in err and not out.strip(), (argv, err)
    assert flag in lines[0], (flag, lines[0])
    assert _tree(world["tmp"]) == before, "a refused command wrote something"
    return lines[0]


def base(command: str, w: dict) -> list[str]:
    """A command line of `command` whose every input is good (the case adds one bad option)."""
    out = os.path.join(w["tmp"], "out-" + command)
    return {"info": ["info", w["model"]], "calibrate": ["calibrate", w["model"], "--text", w["good"], "-o", out],
            "fit": ["fit", w["model"], "-o", out], "compress": ["compress", w["model"], "-o", out],
            "export": ["export", w["art"], "-o", out], "eval": ["eval", w["model"], "--text", w["good"]],
            "bench": ["bench", w["model"], "--text", w["good"]],
            "sweep": ["sweep", w["model"], "-o", out + ".json"]}[command]


FILE_CASES = [  # (command, option, world key of the bad value, the flag named); positionals replace argv[1]
    *[(c, opt, bad, opt) for c, opt in [("compress", "--calibration-text"), ("compress", "--text"),
                                        ("calibrate", "--text"), ("eval", "--text"), ("eval", "--calib"),
                                        ("bench", "--text"), ("bench", "--calib")]
      for bad in ("missing", "empty", "blank", "latin1", "emptydir")],
    *[(c, "MODEL_DIR", bad, "MODEL_DIR") for c in ("fit", "compress", "calibrate", "sweep")
      for bad in ("missing", "emptydir", "good", "art", "compressed")],
    *[(c, "MODEL_DIR", bad, "MODEL_DIR") for c in ("info", "eval", "bench") for bad in ("missing", "emptydir", "art")],
    *[("export", "ARTIFACT", bad, "ARTIFACT") for bad in ("missing", "emptydir", "model", "good")],
    *[(c, "--globe", bad, "--globe") for c in ("eval", "bench") for bad in ("missing", "emptydir", "model")],
    *[("export", "--model", bad, "--model") for bad in ("missing", "compressed", "art")],
    ("eval", "--original", "art", "--original"), ("eval", "--original", "missing", "--original"),
    *[(c, "--tokenizer", bad, "--tokenizer") for c in ("eval", "bench", "calibrate")
      for bad in ("missing", "emptydir", "good")],
    *[("fit", "--calibration", bad, "--calibration") for bad in ("missing", "good", "emptydir")],
    *[("fit", "--config", bad, "--config") for bad in ("missing", "empty", "latin1", "notjson", "emptydir")],
    *[("eval", "--sweep", bad, "--sweep") for bad in ("missing", "empty", "notjson", "listjson")],
    ("eval", "--task-dir", "good", "--task-dir"), ("eval", "--task-dir", "missing", "--task-dir"),
    ("compress", "--calibration-te", "empty", "--calibration-te"),                   # an abbreviation, as typed
]
DRY_RUNS = [(["fit", "--dry-run", "--m", "0"], "--m"), (["compress", "--dry-run", "--total-cut", "1.5"], "--total-cut"),
            (["compress", "--dry-run", "--calibration-text", "{latin1}"], "--calibration-text"),
            (["fit", "--dry-run", "--calibration", "{good}"], "--calibration")]


@pytest.mark.parametrize("command, option, bad, flag", FILE_CASES,
                         ids=[f"{c}-{o}-{b}" for c, o, b, _ in FILE_CASES])
def test_a_bad_input_file_or_directory_is_refused_first(world, capsys, tripwire, command, option, bad, flag):
    argv = base(command, world)
    if option.isupper():
        argv[1] = world[bad]
    else:
        argv = [*argv, option, world[bad]]
    if command == "fit" and option == "--calibration":
        argv.append("--dry-run")                                  # any fit: the stats are read before it
    refused(world, capsys, argv, flag)


@pytest.mark.parametrize("extra, flag", DRY_RUNS, ids=[f"{e[0]}{e[2]}" for e, _ in DRY_RUNS])
def test_a_dry_run_checks_its_inputs_first(world, capsys, tripwire, extra, flag):
    argv = base(extra[0], world)
    refused(world, capsys, [*argv, *[e.format(**world) for e in extra[1:]]], flag)


def _numbers() -> list[tuple[str, str, list[str]]]:
    """(command, flag, bad values) for every int / float option of every command, from the real parsers."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for command in COMMANDS:
        for action in sub.choices[command]._actions:
            if action.type not in (int, float):
                continue
            check = inputs.checker(command, action.dest)
            flag = action.option_strings[-1]
            if isinstance(check, inputs.Count):
                bad = [str(check.low - 1)]
            elif isinstance(check, inputs.Fraction):
                bad = ["1.5"] if action.nargs != "+" else ["0.5", "1.5"]
            elif isinstance(check, inputs.AtLeast):
                bad = [str(check.low - 0.5)]
            else:
                bad = ["0"]
            cases.append((command, flag, bad))
    return cases


NUMBERS = _numbers()


@pytest.mark.parametrize("command, flag, bad", NUMBERS, ids=[f"{c}{f}" for c, f, _ in NUMBERS])
def test_an_out_of_range_number_is_refused_first(world, capsys, tripwire, command, flag, bad):
    refused(world, capsys, [*base(command, world), flag, *bad], flag)


def test_a_fraction_of_zero_and_an_alias_are_named_as_typed(world, capsys, tripwire):
    assert "--total-cut" in refused(world, capsys, [*base("compress", world), "--total-cut", "0"], "--total-cut")
    line = refused(world, capsys, [*base("fit", world), "--atoms", "0"], "--atoms")
    assert "--m" not in line.replace("--m must", "")
    refused(world, capsys, [*base("fit", world), "--atoms", "x"], "--atoms")       # argparse's own refusal
    refused(world, capsys, [*base("fit", world), "--bits", "5"], "--bits")


def test_every_path_and_number_option_has_a_check():
    """A new option that takes a path or a number must be given a kind in globe.cli.inputs (or be an output)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for command in COMMANDS:
        for action in sub.choices[command]._actions:
            pathlike = not action.option_strings or action.metavar in PATHLIKE or action.type in (int, float)
            if action.dest in ("help", "command") or not pathlike or action.dest in inputs.OUTPUTS:
                continue
            if inputs.checker(command, action.dest) is None:
                missing.append(f"globe {command} {action.dest}")
    assert not missing, missing


def test_good_inputs_pass_the_checks(world, capsys, tripwire):
    """The checks refuse only what is wrong: each good command line reaches its run (the tripwire)."""
    lines = [[*base(command, world), *(["--globe", world["compressed"]] if command == "bench" else [])]
             for command in COMMANDS]
    for argv in [*lines, ["eval", world["compressed"], "--text", world["good"], "--tokenizer", world["model"]],
                 ["fit", world["model"], "-o", os.path.join(world["tmp"], "o"), "--budget", "0.4", "--m", "4"]]:
        assert cli.main(argv) == 3 and "reached its run" in capsys.readouterr().err, argv   # the tripwire's error


def test_compress_with_an_empty_text_stops_at_once_in_a_real_process(world, tmp_path):
    """The issue's case, with no tripwire: nothing fitted, OUT never created, one line."""
    proc = subprocess.run([sys.executable, "-m", "globe.cli.main", "compress", world["model"], "-o",
                           str(tmp_path / "out"), "--text", world["empty"]], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--text" in lines[0] and "is empty" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_flag_named_is_the_one_typed():
    parser = cli.build_parser()
    ev = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
    options = frozenset(s for a in ev._actions for s in a.option_strings)
    action = next(a for a in ev._actions if a.dest == "max_tokens")
    assert inputs.typed_flag(action, ["--max-t=0"], options) == "--max-t"           # an abbreviation
    assert inputs.typed_flag(action, ["--mode", "dense"], options) == "--max-tokens"  # another option, not it
    assert inputs.typed_flag(next(a for a in ev._actions if a.dest == "model_dir"), [], options) == "MODEL_DIR"
