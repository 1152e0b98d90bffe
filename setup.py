"""Ships globe-autoload.pth beside the package (site-packages), in wheels and editable installs alike: every
Python process of the environment then registers the "globe" quantizer when it imports transformers (and guards
peft), so stock `from_pretrained(compressed_dir)` and `lm_eval --model hf` load a compressed checkpoint without
`import globe`. The hook itself is globe.export.hf_hook; it imports neither torch nor transformers."""
from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "globe-autoload.pth"


class BuildWithAutoload(build_py):
    """build_py, plus the .pth file at the top of the build directory (the wheel's purelib)."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / PTH
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(__file__).parent / PTH, target)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]

    def get_output_mapping(self) -> dict[str, str]:
        return {**super().get_output_mapping(), str(Path(self.build_lib) / PTH): str(Path(__file__).parent / PTH)}


class _WithAutoload:
    """An editable-install strategy that also writes the .pth file into the editable wheel."""

    def __init__(self, strategy) -> None:
        self.strategy = strategy

    def __call__(self, wheel, files, mapping) -> None:
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH, (Path(__file__).parent / PTH).read_text())

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.strategy.__exit__(*exc)


COMMANDS: dict = {"build_py": BuildWithAutoload}
try:                                         # `pip install -e .`: setuptools' PEP 660 editable wheel
    from setuptools.command.editable_wheel import editable_wheel

    class EditableWithAutoload(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            return _WithAutoload(super()._select_strategy(*args, **kwargs))

    COMMANDS["editable_wheel"] = EditableWithAutoload
except ImportError:                          # an older setuptools: editable installs without the hook
    pass

setup(cmdclass=COMMANDS)
