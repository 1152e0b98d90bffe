"""The README's loading rule and fine-tuning recipe, run as written: the Python snippet that loads a compressed
checkpoint `small` and saves it `again` (in a directory holding a tiny compressed checkpoint named small), the
refusal the loading rule quotes (the load guard's own text), and the recovery recipe's command, whose KL to the
original must go down."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import globe
from globe.export import is_compressed, save_compressed
from globe.formats.load_guard import GUARD
from tests.helpers.fits import char_tokenizer, quick_fit
from tests.helpers.subproc import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _python_block(marker: str) -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if marker in b]
    assert len(blocks) == 1, f"one README python block with {marker!r}, found {len(blocks)}"
    return blocks[0]


def _bash_line(marker: str) -> str:
    lines = [line.split(" #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
             for line in block.splitlines() if marker in line]
    assert len(lines) == 1, f"one README command with {marker!r}, found {lines}"
    return lines[0]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_the_loading_snippet_runs_as_written(tmp_path, tiny_checkpoint):
    model_dir = tmp_path / "model"
    import shutil
    shutil.copytree(tiny_checkpoint("qwen2_moe"), model_dir)
    char_tokenizer(model_dir)
    save_compressed(model_dir, quick_fit(model_dir), tmp_path / "small")
    snippet = _python_block('from_pretrained("small"')
    _run([sys.executable, "-c", snippet], cwd=tmp_path)
    assert is_compressed(tmp_path / "again") and (tmp_path / "again" / "globe_config.json").is_file()
    assert globe.load_compressed(tmp_path / "again") is not None


def test_the_loading_rule_quotes_the_refusal_transformers_prints():
    prose = " ".join(README.split())
    assert f'experts_implementation="{GUARD}"` is not supported' in prose


@pytest.mark.slow
def test_the_recovery_recipe_runs_as_written(tmp_path):
    command = shlex.split(_bash_line("examples/finetune_compressed.py"))
    assert command[0] == "python"
    out = _run([sys.executable, str(ROOT / command[1]), *command[2:]], cwd=tmp_path).stdout
    before, after = (float(x) for x in re.search(r"KL to the original: before ([0-9.]+) after ([0-9.]+)", out).groups())
    assert after < before
    tuned = tmp_path / command[command.index("--out") + 1]
    assert is_compressed(tuned) and globe.load_compressed(tuned) is not None
