"""`import globe` is light: neither torch nor transformers (nor the plotting / eval / lm-eval stacks) until a
name that needs them is used; the public names still resolve."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers.subproc import subprocess_env

HEAVY = ("torch", "transformers", "matplotlib", "lm_eval", "safetensors", "numpy")


def test_import_globe_imports_nothing_heavy():
    code = ("import sys, globe; print(' '.join(m for m in " + repr(HEAVY) + " if m in sys.modules)); "
            "print(globe.load_compressed.__module__, globe.FitConfig.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    heavy, names = proc.stdout.splitlines()
    assert heavy == "" and names == "globe.export.compressed globe.fit.config"
