"""Output directories of fit and export runs: checked before any work, so a long run never dies at the end on a bad -o."""
from __future__ import annotations

import tempfile
from pathlib import Path

from globe.artifact import BANKS_FILE
from globe.errors import ArtifactError
from globe.run.resume_store import RESUME_DIR


def check_output_dir(out: Path, overwrite: bool, resume: bool = False, what_out: str = "artifact") -> None:
    """Fail before any work if OUT cannot take the artifact: not a directory, not writable, or not empty
    (unless --overwrite replaces the artifact or --resume continues an interrupted fit there)."""
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output {out} exists and is not a directory: choose another -o")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        if (out / RESUME_DIR).is_dir():
            what, hint = "holds an interrupted fit", "--resume to continue it or --overwrite to start again"
        elif (out / BANKS_FILE).exists():
            what, hint = "already holds an artifact", "--overwrite to replace it"
        else:
            what, hint = "is not empty", f"--overwrite to write the {what_out} among its files"
        raise ArtifactError(f"output directory {out} {what}: pass {hint}, or choose another -o")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ArtifactError(f"output directory {out} is not writable ({exc.strerror}): choose another -o") from None
