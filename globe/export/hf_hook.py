"""Register the "globe" quantizer with transformers on `import globe` without importing transformers.

    install()     # transformers already imported: register now; else register right after it is imported

Reading checkpoints (globe.io) must not pull in transformers, yet `import globe; import transformers` must leave
from_pretrained able to load compressed checkpoints, in either import order. A one-shot import hook
(sys.meta_path) runs the registration as soon as the `transformers` package has been executed.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys


def _register() -> None:
    from globe.export import hf_quantizer
    hf_quantizer.register()


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of `transformers` so that registering follows its execution."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module) -> None:
            execute(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())
