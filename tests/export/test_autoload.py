"""Stock transformers (and lm-eval's HFLM) load a compressed checkpoint in a process that never ran `import globe`:
globe-autoload.pth, which both the wheel and the editable install put into site-packages, registers the quantizer
when transformers is imported. Where globe is not installed (only on PYTHONPATH: no .pth), stock from_pretrained
stops with one line saying to `pip install` or `import globe` (the load guard, globe.formats.load_guard), never
loading the routed experts randomly initialised; `import globe` first loads it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
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


# Not installed: the interpreter's site-packages on sys.path without its .pth files (python -S), globe importable
# from PYTHONPATH only, as for a user who cloned the repository and never ran pip install.
UNINSTALLED = """
import sys
sys.path.append({site!r})                       # no site.addsitedir: globe-autoload.pth is not processed
{import_globe}
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.float32)
kinds = {{type(m).__name__ for n, m in model.named_modules() if n.endswith('mlp.experts')}}
ids = torch.randint(3, 64, (1, 12), generator=torch.Generator().manual_seed(0))
print(kinds, round(model(input_ids=ids, labels=ids).loss.item(), 5))
"""


def _uninstalled(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)


def test_without_globe_installed_stock_from_pretrained_stops_with_the_fix(compressed):
    site = sysconfig.get_paths()["purelib"]
    proc = _uninstalled(UNINSTALLED.format(site=site, path=str(compressed), import_globe=""))
    assert proc.returncode != 0 and not proc.stdout.strip(), proc.stdout      # no model, random or not
    last = proc.stderr.strip().splitlines()[-1]
    assert "pip install globe-moe" in last and "import globe" in last, last
    loaded = _uninstalled(UNINSTALLED.format(site=site, path=str(compressed), import_globe="import globe"))
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["{'GlobeExperts'}", str(_reference_loss(compressed))]


def test_lm_eval_hflm_without_globe_installed_refuses_loudly(compressed):
    pytest.importorskip("lm_eval")
    code = (f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
            "from lm_eval.models.huggingface import HFLM\n"
            f"lm = HFLM(pretrained={str(compressed)!r}, tokenizer={str(REPO / 'globe/assets/globe-tiny-moe')!r}, "
            "device='cpu', batch_size=1)\nprint('LOADED')")
    proc = _uninstalled(code)
    assert proc.returncode != 0 and "LOADED" not in proc.stdout
    assert "globe" in proc.stderr.strip().splitlines()[-1]          # lm-eval's own check names the quant method


def test_the_guard_survives_save_pretrained_and_leaves_dense_exports(compressed, tmp_path):
    import torch
    from globe.export import load_compressed
    from globe.formats.load_guard import GUARD, GUARD_KEY
    assert json.loads((compressed / "config.json").read_text())[GUARD_KEY] == GUARD
    model = load_compressed(compressed, dtype=torch.float32)
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())[GUARD_KEY] == GUARD
    from globe.run.export import ExportRun, run_export
    run_export(ExportRun(artifact=str(compressed), out=str(tmp_path / "dense"), dense=True, device="cpu"))
    assert GUARD_KEY not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert json.loads((compressed / "config.json").read_text())[GUARD_KEY] == GUARD      # the source untouched


def test_importing_the_quantizer_module_first_registers_it(tmp_path):
    """With the autoload hook installed, `from globe.export import hf_quantizer` as the first import (it imports
    transformers itself, which fires the hook) works and leaves "globe" registered: no circular import."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(REPO / "globe-autoload.pth", site)
    code = (f"import site; site.addsitedir({str(site)!r})\n"
            "from globe.export import hf_quantizer\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
            "print('globe' in AUTO_QUANTIZER_MAPPING)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True"]
