"""Every shell command the README, docs/API.md and docs/RESULTS_HISTORY.md show works as written.

The main job of the README's first command (after its set-up, which CI runs itself) and the concrete Hydra command
are run as written in an empty directory. Every other command is a template (MODEL_DIR, [--option VALUE], a 25 GB
checkpoint): each of its words that looks like an option must be an option of the real parser of that command
(`globe` subcommands, the Hydra config, the benchmark scripts' --help), so a renamed or removed flag turns this red.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import globe.cli.main as cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "API.md", ROOT / "docs" / "RESULTS_HISTORY.md"]
SETUP = ("python3 -m venv", ". .venv/bin/activate", "pip install")
RUN_AS_WRITTEN = ("python -m globe.fit_banks model=tiny bank.m=8 train.am_iters=2 out=runs/hydra",)


def _strip_comment(line: str) -> str:
    return re.split(r"\s#\s|\s#$|^#", line, maxsplit=1)[0].rstrip()


def shell_commands(text: str) -> list[str]:
    """Commands of the ```bash blocks: comments dropped, `\\`-continued and indented lines joined."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = False
        for raw in block.splitlines():
            code = _strip_comment(raw)
            if not code.strip():
                joined = False
                continue
            if commands and (joined or raw[:1].isspace()):
                commands[-1] = f"{commands[-1]} {code.strip().rstrip(chr(92)).strip()}"
            else:
                commands.append(code.rstrip(chr(92)).strip())
            joined = code.endswith("\\")
    return commands


def parts(command: str) -> list[str]:
    return [p.strip() for p in command.split("&&") if p.strip()]


def all_parts() -> list[str]:
    return [p for doc in DOCS for c in shell_commands(doc.read_text()) for p in parts(c)]


def _flags(tokens: list[str]) -> list[str]:
    """Words that are options: -o, --name (brackets, parentheses and =VALUE stripped)."""
    out = []
    for tok in tokens:
        word = tok.strip("[]()").split("=")[0]
        if re.fullmatch(r"-[a-zA-Z]|--[a-z][a-z0-9-]*", word):
            out.append(word)
    return out


@functools.cache
def _globe_options() -> dict[str, set[str]]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    top = {s for a in parser._actions for s in a.option_strings}
    return {name: top | {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def check_globe(tokens: list[str], where: str) -> None:
    options = _globe_options()
    assert tokens and tokens[0] in options, f"{where}: `globe {tokens[:1]}` is not a globe command"
    unknown = [f for f in _flags(tokens[1:]) if f not in options[tokens[0]]]
    assert not unknown, f"{where}: globe {tokens[0]} has no option {unknown}"


def check_hydra(tokens: list[str], where: str) -> None:
    from globe.hydra_app import compose_run_config
    overrides = [t for t in tokens if "=" in t and not t.startswith("-")]
    if "--cfg" in tokens:
        assert tokens[tokens.index("--cfg") + 1] in ("job", "hydra", "all"), where
    compose_run_config(overrides)                         # unknown keys / bad values raise


@functools.cache
def _script_help(script: str) -> str:
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, f"{script} --help failed: {done.stderr[-500:]}"
    return done.stdout


def check_script(tokens: list[str], where: str) -> None:
    script = tokens[0]
    assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
    text = _script_help(script)
    unknown = [f for f in _flags(tokens[1:]) if not re.search(rf"(^|[\s,\[]){re.escape(f)}\b", text)]
    assert not unknown, f"{where}: {script} has no option {unknown}"


def check(part: str, where: str) -> None:
    tokens = shlex.split(part)
    if part.startswith(SETUP) or part in ("python -m pytest -q", "bash .ci/run"):
        return                                            # run by CI itself
    if tokens[0] == "globe":
        check_globe(tokens[1:], where)
    elif tokens[0] == "torchrun":
        check_globe(tokens[tokens.index("globe.cli.main") + 1:], where)
    elif tokens[:3] == ["python", "-m", "globe.fit_banks"]:
        check_hydra(tokens[3:], where)
    elif tokens[0] == "python" and tokens[1].endswith(".py"):
        check_script(tokens[1:], where)
    elif tokens[:2] == ["python", "-c"]:
        compile(tokens[2], where, "exec")
    else:
        pytest.fail(f"{where}: no check knows the command `{part}`: teach tests/docs/test_readme_commands.py")


def test_the_docs_show_commands_and_the_main_job_first():
    first = shell_commands((ROOT / "README.md").read_text())
    assert len(all_parts()) > 20
    assert first[0].startswith("python3 -m venv") and parts(first[0])[-1].startswith("globe compress")
    assert first[1] == ". .venv/bin/activate && python -m pytest -q"


def test_every_command_names_real_options():
    failures = []
    for doc in DOCS:
        for command in shell_commands(doc.read_text()):
            for part in parts(command):
                try:
                    check(part, f"{doc.name}: {part[:60]}")
                except AssertionError as exc:
                    failures.append(str(exc).splitlines()[0])
    assert not failures, "\n".join(failures)


def test_checks_catch_a_renamed_option():
    with pytest.raises(AssertionError, match="no option"):
        check("globe fit -o OUT --atoms-per-bank 8", "example")
    with pytest.raises(AssertionError, match="not a globe command"):
        check("globe squeeze -o OUT", "example")
    with pytest.raises(Exception):
        check("python -m globe.fit_banks bank.atoms=8", "example")


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT)}
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_the_main_job_runs_as_written(tmp_path):
    main_job = parts(shell_commands((ROOT / "README.md").read_text())[0])[-1]
    done = _run(main_job, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "runs" / "default"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "globe"
    assert "rel_err" in done.stdout and "compressed checkpoint written" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", RUN_AS_WRITTEN)
def test_concrete_commands_run_as_written(command, tmp_path):
    assert any(command in part for part in all_parts()), f"{command} is no longer in the docs: update RUN_AS_WRITTEN"
    done = _run(command, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "runs" / "hydra" / "banks.safetensors").is_file()
