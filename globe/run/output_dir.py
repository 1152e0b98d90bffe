"""Output directories of fit and export runs: checked before any work, so a long run never dies at the end on a bad -o.
The rules live in globe.core.outputs (claim_output_dir is what the runs use); this name is kept for callers."""
from __future__ import annotations

from pathlib import Path

from globe.core.outputs import check_output_dir as _check


def check_output_dir(out: Path, overwrite: bool, resume: bool = False, what_out: str = "artifact") -> None:
    """See globe.core.outputs.check_output_dir."""
    _check(out, overwrite, resume, what=what_out)
