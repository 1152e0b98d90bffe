"""docs/API.md: every ```python block runs, in order, in one namespace, in an empty directory."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[2] / "docs" / "API.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_docs_have_snippets_for_the_public_api():
    text = API.read_text()
    blocks = "\n".join(python_blocks(text))
    for name in ("globe.fit_model", "globe.save", "globe.load", "globe.apply_globe", "globe.save_compressed",
                 "globe.load_compressed", "globe.export_dense", "globe.evaluate", "globe.FitConfig",
                 "compose_run_config", "tracking.session", "write_plots"):
        assert name in blocks, name


@pytest.mark.slow
def test_every_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__api_docs__"}
    blocks = python_blocks(API.read_text())
    assert len(blocks) >= 8
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{API.name}[python block {i}]", "exec"), namespace)
        except Exception as exc:
            pytest.fail(f"docs/API.md python block {i} failed: {type(exc).__name__}: {exc}\n{block}")
    assert (tmp_path / "runs" / "art" / "banks.safetensors").is_file()
