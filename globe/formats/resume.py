"""The resume-file format: what a fit leaves in OUT/.globe_checkpoint/ for `globe fit --resume`.

    <family>.safetensors           a finished family: its tensors as the artifact stores them (globe.formats.artifact,
                                   fp32) and, in the header, `format_version` FAMILY_VERSION, phi, metrics, history
    <family>.progress.safetensors  a family in progress (globe.fit.resume.FitProgress): its tensors and, in the
                                   header, one JSON string `progress` tagged with `format` PROGRESS_VERSION
Both carry the fit's `fingerprint` in the header (globe.run.resume_store decides what matches). Tensors + JSON
only, no pickle; every file is written atomically. A progress file of another format raises ValueError (the store
reports it and refits the family); finished-family files written before they carried a version read as version 1.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from globe.core.files import atomic_write
from globe.core.outputs import CHECKPOINT_DIR, json_text
from globe.core.result import FamilyFit
from globe.formats.artifact import build_family, family_tensors

RESUME_DIR = CHECKPOINT_DIR            # ".globe_checkpoint": name kept, interrupted fits of earlier versions resume
PROGRESS_VERSION = 2
FAMILY_VERSION = 1


def family_path(directory: Path, family: str) -> Path:
    return directory / f"{family}.safetensors"


def progress_path(directory: Path, family: str) -> Path:
    return directory / f"{family}.progress.safetensors"


def write_file(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """One resume file, written atomically."""
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a resume file; safetensors' / the OS's errors pass through."""
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return tensors, meta


def read_fingerprint(path: Path) -> str | None:
    with safe_open(str(path), "pt") as fh:
        return (fh.metadata() or {}).get("fingerprint")


def encode_family(fam: FamilyFit, fingerprint: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a finished family's file."""
    meta = {"fingerprint": fingerprint, "format_version": str(FAMILY_VERSION), "phi": fam.phi,
            "metrics": json_text(fam.metrics), "history": json_text(fam.history)}
    if fam.ranks is not None:                  # adapters kept padded [N, p, r_max]; the ranks ride in the metadata
        meta["ranks"] = json_text(list(fam.ranks))
    return family_tensors(replace(fam, ranks=None)), meta


def decode_family(family: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> FamilyFit:
    """Inverse of encode_family; ValueError for a file of a newer format."""
    version = meta.get("format_version", "1")
    if not version.isdigit() or not 1 <= int(version) <= FAMILY_VERSION:
        raise ValueError(f"finished-family format {version!r}, this version reads 1..{FAMILY_VERSION}")
    t = {k.split(".", 1)[1]: v for k, v in tensors.items()}
    return build_family(family, t, meta["phi"], json.loads(meta["metrics"]), json.loads(meta["history"]),
                        json.loads(meta["ranks"]) if "ranks" in meta else None)


def encode_progress(record: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a fit in progress given as a plain record:
    {"cursor": [restart, cycle, stage], "varpro": [...], "err": x,
     "state": {"bank", "codes", "best_bank", "best_codes" (tensors or None), "temperature", "iteration",
               "best_err", "history"} or None,
     "best": {"bank", "codes" (tensors), "err", "temperature", "history"} or None, "gen_state": tensor or None}."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format": PROGRESS_VERSION, "cursor": list(record["cursor"]), "varpro": record["varpro"],
                            "err": record["err"]}
    state = record.get("state")
    if state is not None:
        tensors.update({"state.bank": state["bank"], "state.codes": state["codes"]})
        if state.get("best_bank") is not None:
            tensors.update({"state.best_bank": state["best_bank"], "state.best_codes": state["best_codes"]})
        meta["state"] = {k: state[k] for k in ("temperature", "iteration", "best_err", "history")}
    best = record.get("best")
    if best is not None:
        tensors.update({"best.bank": best["bank"], "best.codes": best["codes"]})
        meta["best"] = {k: best[k] for k in ("err", "temperature", "history")}
    if record.get("gen_state") is not None:
        tensors["gen_state"] = record["gen_state"]
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return tensors, {"progress": json.dumps(meta)}


def decode_progress(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, Any]:
    """Inverse of encode_progress: the plain record; ValueError for a checkpoint of another format."""
    info = json.loads(meta["progress"])
    if info.get("format") != PROGRESS_VERSION:
        raise ValueError(f"resume format {info.get('format')!r}, this version reads {PROGRESS_VERSION}")
    state = best = None
    if "state" in info:
        state = {"bank": tensors["state.bank"], "codes": tensors["state.codes"],
                 "best_bank": tensors.get("state.best_bank"), "best_codes": tensors.get("state.best_codes"),
                 **{k: info["state"][k] for k in ("temperature", "iteration", "best_err", "history")}}
    if "best" in info:
        best = {"bank": tensors["best.bank"], "codes": tensors["best.codes"],
                **{k: info["best"][k] for k in ("err", "temperature", "history")}}
    return {"cursor": info["cursor"], "varpro": info["varpro"], "err": info["err"], "state": state, "best": best,
            "gen_state": tensors.get("gen_state")}
