"""Where a family's fit stands, with enough state to continue it bit-identically after a crash.

The engine hands a FitProgress to a FitStore every `train.checkpoint_every` AM iterations and at the end of each
phase (AM, variable projection, restart); a resumed fit starts from the stored progress instead of the warm
start. Everything the remaining computation depends on is here: the AM state (bank, codes, temperature, the
best state seen in the current cycle), the histories, the best finished restart, and the random generator.
Serialisation is tensors + JSON strings (safetensors metadata), no pickle.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from globe.fit.am import AMState
from globe.fit.result import FamilyFit

PHASES = ("warm_start", "cycle_start", "am", "varpro", "done")


@dataclass
class Attempt:
    """A finished restart: its error after the last cycle and the state it ended in."""

    err: float
    bank: torch.Tensor            # [m, r, d]
    codes: torch.Tensor           # [N, m]
    temperature: float
    history: dict


@dataclass
class FitProgress:
    attempt: int                  # restart index in progress (== restarts once all are done)
    cycle: int                    # cycle index within the attempt
    phase: str                    # one of PHASES: what runs next
    state: AMState | None         # None before a warm start and once phase == "done"
    varpro: list[float] = field(default_factory=list)
    err: float = math.inf         # error of the current attempt after its last finished cycle
    best: Attempt | None = None   # best finished attempt so far
    gen_state: torch.Tensor | None = None   # torch.Generator state (uint8)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, string metadata) describing this progress exactly."""
        tensors: dict[str, torch.Tensor] = {}
        meta = {"attempt": self.attempt, "cycle": self.cycle, "phase": self.phase, "varpro": self.varpro,
                "err": self.err}
        if self.state is not None:
            s = self.state
            tensors.update({"state.bank": s.bank, "state.codes": s.codes})
            if s.best_bank is not None:
                tensors.update({"state.best_bank": s.best_bank, "state.best_codes": s.best_codes})
            meta["state"] = {"temperature": s.temperature, "iteration": s.iteration, "best_err": s.best_err,
                             "history": s.history}
        if self.best is not None:
            tensors.update({"best.bank": self.best.bank, "best.codes": self.best.codes})
            meta["best"] = {"err": self.best.err, "temperature": self.best.temperature,
                            "history": self.best.history}
        if self.gen_state is not None:
            tensors["gen_state"] = self.gen_state
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return tensors, {"progress": json.dumps(meta)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> FitProgress:
        info = json.loads(meta["progress"])
        if info["phase"] not in PHASES:
            raise ValueError(f"unknown phase {info['phase']!r}")
        state = None
        if "state" in info:
            s = info["state"]
            state = AMState(bank=tensors["state.bank"], codes=tensors["state.codes"], temperature=s["temperature"],
                            iteration=s["iteration"], best_err=s["best_err"], best_bank=tensors.get("state.best_bank"),
                            best_codes=tensors.get("state.best_codes"), history=s["history"])
        best = None
        if "best" in info:
            b = info["best"]
            best = Attempt(err=b["err"], bank=tensors["best.bank"], codes=tensors["best.codes"],
                           temperature=b["temperature"], history=b["history"])
        return cls(attempt=info["attempt"], cycle=info["cycle"], phase=info["phase"], state=state,
                   varpro=info["varpro"], err=info["err"], best=best, gen_state=tensors.get("gen_state"))

    def to(self, device: torch.device) -> FitProgress:
        """The same progress with its tensors on `device` (the generator state stays on the CPU)."""
        if self.state is not None:
            s = self.state
            s.bank, s.codes = s.bank.to(device), s.codes.to(device)
            if s.best_bank is not None:
                s.best_bank, s.best_codes = s.best_bank.to(device), s.best_codes.to(device)
        if self.best is not None:
            self.best.bank, self.best.codes = self.best.bank.to(device), self.best.codes.to(device)
        return self


class FitStore(Protocol):
    """Where fit_model keeps finished families and in-progress state (globe.checkpoint implements it on disk)."""

    def finished(self, family: str) -> FamilyFit | None: ...

    def progress(self, family: str) -> FitProgress | None: ...

    def save_progress(self, family: str, progress: FitProgress) -> None: ...

    def save_family(self, fam: FamilyFit) -> None: ...
