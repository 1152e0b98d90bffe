"""Import a benchmark script (benchmarks/NAME.py) or a script (scripts/NAME.py) as a module, to call its functions
and main(argv) in tests."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str) -> ModuleType:
    """Import scripts/NAME.py; scripts/ goes on sys.path because the scripts import each other by name."""
    import sys
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)


def small_upcycled(out: Path) -> Path:
    """A 2-layer, 8-expert upcycled Qwen2-MoE (p=64, d=128, bf16; benchmarks/make_upcycled.py) written to `out`:
    large enough that the routed experts dominate its bytes."""
    load_benchmark("make_upcycled").main(["--out", str(out), "--layers", "2", "--experts", "8", "--hidden", "128",
                                          "--intermediate", "64", "--rank", "8"])
    return out
