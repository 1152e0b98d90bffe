"""Stock transformers (and lm-eval's HFLM) load a compressed checkpoint in a process that never ran `import globe`:
globe-autoload.pth, which both the wheel and the editable install put into site-packages, registers the quantizer
when transformers is imported."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from globe.export import save_compressed
from tests.helpers.fits import quick_fit
from tests.helpers.subproc import REPO, subprocess_env

STOCK = """
import site, sys
site.addsitedir({site!r})                      # what the interpreter does with site-packages at startup
assert 'torch' not in sys.modules and 'transformers' not in sys.modules
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.float32)
kinds = {{type(m).__name__ for n, m in model.named_modules() if n.endswith('mlp.experts')}}
ids = torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(0))
print(kinds, round(model(input_ids=ids, labels=ids).loss.item(), 5))
"""


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_checkpoint):
    path = tiny_checkpoint("qwen2_moe")
    return save_compressed(path, quick_fit(path), tmp_path_factory.mktemp("auto") / "c")


def _reference_loss(path) -> float:
    import torch
    from globe.export import load_compressed
    model = load_compressed(path, dtype=torch.float32)
    ids = torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return round(model(input_ids=ids, labels=ids).loss.item(), 5)


def test_stock_from_pretrained_without_import_globe_loads_the_compressed_model(compressed, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(REPO / "globe-autoload.pth", site)
    proc = subprocess.run([sys.executable, "-c", STOCK.format(site=str(site), path=str(compressed))],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["{'GlobeExperts'}", str(_reference_loss(compressed))]
    assert "Unknown quantization type" not in proc.stderr


def test_lm_eval_hflm_loads_it_without_import_globe(compressed, tmp_path):
    pytest.importorskip("lm_eval")
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(REPO / "globe-autoload.pth", site)
    code = (f"import site; site.addsitedir({str(site)!r})\n"
            "from lm_eval.models.huggingface import HFLM\n"
            f"lm = HFLM(pretrained={str(compressed)!r}, tokenizer={str(REPO / 'globe/assets/globe-tiny-moe')!r}, "
            "device='cpu', batch_size=1)\n"
            "print(sorted({type(m).__name__ for n, m in lm.model.named_modules() if n.endswith('mlp.experts')}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "['GlobeExperts']"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_both_install_kinds_ship_the_pth_file(tmp_path, kind):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "globe-autoload.pth", "README.md"):
        shutil.copy(REPO / name, src)
    shutil.copytree(REPO / "globe", src / "globe", ignore=shutil.ignore_patterns("__pycache__"))
    build = "build_wheel" if kind == "wheel" else "build_editable"
    proc = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta as b; "
                                                 f"print(b.{build}({str(tmp_path / 'dist')!r}))"],
                          cwd=src, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = tmp_path / "dist" / proc.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as z:
        assert z.read("globe-autoload.pth") == (REPO / "globe-autoload.pth").read_bytes()
