"""Where a family's fit stands (`FitProgress`), with enough state to continue it bit-identically after a crash.

The engine's stage runner (globe.fit.alternate) hands a FitProgress to a FitStore every `train.checkpoint_every`
AM iterations, after each AM and VarPro stage and at the end of each restart; a resumed fit continues from the
stored cursor instead of the warm start. The cursor is (restart, cycle, stage) with `stage` the stage that runs
next (STAGES). Everything the remaining computation depends on is here: the AM state (bank, codes, temperature,
the best state seen in the current cycle), the histories, the best finished restart, and the random generator.

Serialisation (tensors + one JSON string, no pickle, tagged with its format version) is globe.formats.resume: a
checkpoint of another format raises ValueError (the store reports it and refits the family).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from globe.fit.solvers.am import AMState
from globe.core.result import FamilyFit
from globe.formats.resume import decode_progress, encode_progress

STAGES = ("warm_start", "cycle_start", "am", "varpro", "done")   # warm_start: take this restart's warm start;
# cycle_start: reset the per-cycle best (or end the restart after the last cycle); am: (continue) AM; varpro:
# settle on the best AM state, then variable projection; done: every restart has finished.


@dataclass(frozen=True)
class Cursor:
    """Position of the stage runner: what runs next."""

    restart: int = 0              # restart in progress (== restarts once all are done)
    cycle: int = 0                # [AM, VarPro] cycle within the restart
    stage: str = "warm_start"     # one of STAGES

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}")


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
    """The resumable state of the [AM, VarPro] x cycles x restarts loop at a cursor."""

    cursor: Cursor = field(default_factory=Cursor)
    state: AMState | None = None  # None before a warm start and once the cursor is "done"
    varpro: list[float] = field(default_factory=list)   # VarPro losses of the current restart
    err: float = math.inf         # error of the current restart after its last finished cycle
    best: Attempt | None = None   # best finished restart so far
    gen_state: torch.Tensor | None = None   # torch.Generator state (uint8) when the checkpoint was taken

    @property
    def attempt(self) -> int:
        return self.cursor.restart

    @property
    def cycle(self) -> int:
        return self.cursor.cycle

    @property
    def phase(self) -> str:
        return self.cursor.stage

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, string metadata) describing this progress exactly (globe.formats.resume)."""
        c, s, b = self.cursor, self.state, self.best
        state = None if s is None else {"bank": s.bank, "codes": s.codes, "best_bank": s.best_bank,
                                        "best_codes": s.best_codes, "temperature": s.temperature,
                                        "iteration": s.iteration, "best_err": s.best_err, "history": s.history}
        best = None if b is None else {"bank": b.bank, "codes": b.codes, "err": b.err, "temperature": b.temperature,
                                       "history": b.history}
        return encode_progress({"cursor": [c.restart, c.cycle, c.stage], "varpro": self.varpro, "err": self.err,
                                "state": state, "best": best, "gen_state": self.gen_state})

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> FitProgress:
        """Inverse of to_tensors; ValueError for a checkpoint of another format or an unknown stage."""
        record = decode_progress(tensors, meta)
        state = None if record["state"] is None else AMState(**record["state"])
        best = None if record["best"] is None else Attempt(**record["best"])
        return cls(cursor=Cursor(*record["cursor"]), state=state, varpro=record["varpro"], err=record["err"],
                   best=best, gen_state=record["gen_state"])

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
    """Where fit_model keeps finished families and in-progress state (globe.run.resume_store implements it on disk)."""

    def finished(self, family: str) -> FamilyFit | None: ...

    def progress(self, family: str) -> FitProgress | None: ...

    def save_progress(self, family: str, progress: FitProgress) -> None: ...

    def save_family(self, fam: FamilyFit) -> None: ...

    def reload(self, family: str) -> FamilyFit: ...
