"""Resume files of a fit inside its output directory, for `globe fit --resume` (the run layer's store).

Wording: a *checkpoint* is a model directory (config.json + safetensors); what a fit leaves to resume from are
*resume files*. OUT/.globe_checkpoint/<family>.safetensors holds a finished family (tensors; metrics and the fit
fingerprint in the header); OUT/.globe_checkpoint/<family>.progress.safetensors holds a family in progress (see
globe.fit.resume); their format is globe.formats.resume. Every file is written atomically, so a crash at any moment leaves the previous or the new
complete resume file. A resumed run reuses only resume files whose fingerprint (fit config + model directory +
content hash of its routed experts) equals the current one; anything else is reported and ignored, never
silently mixed in.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from safetensors import SafetensorError

from globe.core.result import FamilyFit
from globe.errors import CheckpointError, GlobeError
from globe.fit.config import FitConfig
from globe.fit.resume import FitProgress
from globe.formats.resume import (RESUME_DIR, decode_family, encode_family, family_path, progress_path, read_file,
                                  read_fingerprint, write_file)

log = logging.getLogger(__name__)


def _fingerprint(cfg: FitConfig, model_dir: str) -> str:
    """Fit config + model directory + content hash of its routed experts (globe.io.identity): a checkpoint of
    the same directory whose weights were replaced since is not reused."""
    from globe.io import open_checkpoint
    try:
        with open_checkpoint(model_dir) as reader:
            content = reader.content_hash()
    except GlobeError:                                  # not a readable checkpoint: no fit will run on it
        content = None
    return json.dumps({"config": cfg.to_dict(), "model_dir": str(Path(model_dir).resolve()), "content": content},
                      sort_keys=True)


def _read(path: Path, fingerprint: str, what: str):
    """(tensors, metadata) of a resume file made with `fingerprint`, else None (with a warning)."""
    if not path.is_file():
        return None
    try:
        tensors, meta = read_file(path)
    except (SafetensorError, OSError) as exc:
        log.warning("ignoring unreadable resume file %s (%s): %s will be refitted", path, exc, what)
        return None
    if meta.get("fingerprint") != fingerprint:
        log.warning("resume file %s was made with another config or model: %s will be refitted", path, what)
        return None
    return tensors, meta


class ResumeStore:
    """globe.fit.resume.FitStore on disk. With resume=False nothing stored earlier is read."""

    def __init__(self, out: str | Path, cfg: FitConfig, model_dir: str | Path, resume: bool = True) -> None:
        self.dir = Path(out) / RESUME_DIR
        self.cfg, self.model_dir = cfg, str(model_dir)
        self._fingerprint: str | None = None
        self.resume = resume

    @property
    def fingerprint(self) -> str:
        """Computed on first use (the model is read by then, so a bad model dir fails in the reader first)."""
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self.cfg, self.model_dir)
        return self._fingerprint

    def has_matching(self) -> bool:
        """Whether a checkpoint made with this config and model exists (something for --resume to continue)."""
        if not self.dir.is_dir():
            return False
        for path in self.dir.glob("*.safetensors"):
            try:
                if read_fingerprint(path) == self.fingerprint:
                    return True
            except (SafetensorError, OSError):
                continue
        return False

    def finished(self, family: str) -> FamilyFit | None:
        return self._family(family) if self.resume else None

    def reload(self, family: str) -> FamilyFit:
        """A family this run saved with save_family (fit_model spills large finished families to disk)."""
        fam = self._family(family)
        if fam is None:
            raise CheckpointError(f"{family_path(self.dir, family)} went missing or changed while the fit ran; "
                                  f"rerun with --resume")
        return fam

    def _family(self, family: str) -> FamilyFit | None:
        path = family_path(self.dir, family)
        found = _read(path, self.fingerprint, family)
        if found is None:
            return None
        try:
            return decode_family(family, *found)
        except ValueError as exc:
            log.warning("ignoring resume file %s (%s): %s will be refitted", path, exc, family)
            return None

    def progress(self, family: str) -> FitProgress | None:
        path = progress_path(self.dir, family)
        found = _read(path, self.fingerprint, family) if self.resume else None
        if found is None:
            return None
        try:
            return FitProgress.from_tensors(*found)
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("ignoring inconsistent resume file %s (%s): %s will be refitted", path, exc, family)
            return None

    def save_progress(self, family: str, progress: FitProgress) -> None:
        tensors, meta = progress.to_tensors()
        meta["fingerprint"] = self.fingerprint
        write_file(progress_path(self.dir, family), tensors, meta)

    def save_family(self, fam: FamilyFit) -> None:
        write_file(family_path(self.dir, fam.family), *encode_family(fam, self.fingerprint))
        progress_path(self.dir, fam.family).unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
