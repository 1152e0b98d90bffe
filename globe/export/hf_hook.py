"""Register GloBE with transformers (and guard peft) on `import globe`, without importing either.

    install()     # a package already imported: act now; else right after it is imported

Reading checkpoints (globe.io) must not pull in transformers, yet `import globe; import transformers` must leave
from_pretrained able to load compressed checkpoints, in either import order. One-shot import hooks
(sys.meta_path) run the registration as soon as the package has been executed: `transformers` gets the "globe"
quantizer (globe.export.hf_quantizer), `peft` the check of target_parameters (globe.export.peft_guard).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable


def _register_quantizer() -> None:
    module = sys.modules.get("globe.export.hf_quantizer")
    if module is not None and not hasattr(module, "register"):
        return                        # hf_quantizer is importing transformers itself: it registers at its own end
    from globe.export import hf_quantizer
    hf_quantizer.register()


def _guard_peft() -> None:
    from globe.export import peft_guard
    peft_guard.install()


AFTER_IMPORT: dict[str, Callable[[], None]] = {"transformers": _register_quantizer, "peft": _guard_peft}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of one package so that `action` follows its execution."""

    def __init__(self, name: str, action: Callable[[], None]) -> None:
        self.name, self.action, self.searching = name, action, False

    def find_spec(self, name, path=None, target=None):
        if name != self.name or self.searching:
            return None
        self.searching = True                     # the spec of the other finders (a probe such as
        try:                                      # importlib.util.find_spec("peft") may not import it)
            spec = importlib.util.find_spec(name)
        finally:
            self.searching = False
        if spec is None or spec.loader is None:
            return spec
        execute, hook = spec.loader.exec_module, self

        def exec_module(module) -> None:
            execute(module)
            if hook in sys.meta_path:
                sys.meta_path.remove(hook)
                hook.action()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    for name, action in AFTER_IMPORT.items():
        if name in sys.modules:
            action()
        elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport(name, action))
