"""fit_family: normalise -> warm start -> alternating minimisation -> (refine) -> fold back, for one family.
fit_model: stream each family of a checkpoint through fit_family. Returns tensors and metrics, writes nothing."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from globe.fit.adapters import compose, refit_adapters
from globe.fit.am import AMState, run_am
from globe.fit.budget import candidate_shapes, choose_shape
from globe.fit.config import FitConfig
from globe.fit.metrics import bank_metrics, code_metrics, error_metrics, peak_memory_mb, phase
from globe.fit.normalize import Normalizer
from globe.fit.mod import normalize_atoms
from globe.fit.refine import adam_refine, varpro_refine
from globe.fit.result import FamilyFit, FitResult
from globe.fit.warm_start import align_factors, aligned_targets, expert_factors, warm_start

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def gram64(x: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """x @ x.T in fp64 for x [N, D]: at once for fp32 x, by row blocks (upcast per block) for narrower x."""
    if x.dtype == torch.float32:
        return x.double() @ x.double().T
    n = x.shape[0]
    out = torch.empty(n, n, dtype=torch.float64, device=x.device)
    for lo in range(0, n, chunk):
        xi = x[lo:lo + chunk].double()
        for lo2 in range(0, lo + chunk, chunk):
            block = xi @ x[lo2:lo2 + chunk].double().T
            out[lo:lo + chunk, lo2:lo2 + chunk] = block
            out[lo2:lo2 + chunk, lo:lo + chunk] = block.T
    return out


def pick_shape(weights: torch.Tensor, norm: Normalizer, cfg: FitConfig, device,
               spectra: dict | None = None) -> tuple[int, int]:
    """(m, r) from the config, or chosen on the data to meet cfg.bank.budget.

    The per-expert SVDs are computed once (expert_factors) for every probed rank; pass a dict as `spectra` to
    get them back ("factors", "cov") for the warm start.
    """
    n, p, d = weights.shape
    b, k = cfg.bank, cfg.sparsity.target_support
    if b.m is not None and b.r is not None:
        return b.m, b.r
    cands = candidate_shapes(n, p, d, b.budget, k)
    if b.r is not None:
        cands = [(m, r) for m, r in cands if r == b.r] or cands
    grid = sorted({r for _, r in cands})
    probe = grid[:: max(1, len(grid) // 4)][:5]
    if not probe:                                                           # no shape fits: ConfigError
        return choose_shape(n, p, d, b.budget, k, torch.zeros(n, 0))
    svals, factors, cov = expert_factors(weights, norm, max(probe), cfg.train.chunk_size, device)
    stacked = {}
    for r in probe:
        x = align_factors(factors, cov, r, cfg.train.chunk_size).reshape(n, -1)
        stacked[r] = torch.linalg.svdvals(gram64(x)).sqrt().cpu()
        del x
    if spectra is not None:
        spectra.update(factors=factors, cov=cov)
    m, r = choose_shape(n, p, d, b.budget, k, svals, stacked)
    return (b.m if b.m is not None else m), r


def finalize(weights, norm: Normalizer, codes, bank, phi: str, cfg: FitConfig):
    """Exact adapters for phi(codes @ bank), chunk by chunk, in the normalised space.

    Returns (adapters [N, p, r], codes [N, m], sq_err [N] in the original space). With identity phi the codes
    are put on the simplex and their row sums moved into the adapters.
    """
    n, dev = weights.shape[0], bank.device
    if phi == "identity":
        codes = codes / codes.sum(-1, keepdim=True).clamp_min(1e-30)
    adapters = torch.empty(n, weights.shape[1], bank.shape[1], device=dev)
    sq_err = torch.empty(n, dtype=torch.float64)
    for lo in range(0, n, cfg.train.chunk_size):
        hi = min(lo + cfg.train.chunk_size, n)
        fit = refit_adapters(norm.chunk(weights, lo, hi, dev), compose(codes[lo:hi], bank, phi), cfg.train.ridge)
        adapters[lo:hi] = fit.adapters
        sq_err[lo:hi] = fit.sq_err.double().cpu() * norm.scales[lo:hi].double() ** 2
    return adapters, codes, sq_err


def _rel(sq_err: torch.Tensor, norm: Normalizer) -> float:
    return float((sq_err.sum() / norm.sq_norms.sum()).sqrt())


def fit_family(weights: torch.Tensor, ids: torch.Tensor, cfg: FitConfig, family: str = "gate",
               generator: torch.Generator | None = None) -> FamilyFit:
    """Fit one family: weights [N, p, d] (any float dtype, kept as stored), ids [N, 2] (layer, expert)."""
    cfg.validate()
    device = resolve_device(cfg.train.device)
    gen = generator if generator is not None else torch.Generator().manual_seed(cfg.train.seed)
    timings: dict = {}
    with phase(timings, "normalize", device):
        names = [f"{family} of layer {int(l)} expert {int(e)}" for l, e in ids.tolist()]
        norm = Normalizer.fit(weights, cfg.train.chunk_size, names)
    with phase(timings, "shape", device):
        spectra: dict = {}
        m, r = pick_shape(weights, norm, cfg, device, spectra)
    log.info("fitting %s: N=%d p=%d d=%d with m=%d r=%d (%s init)", family, *weights.shape, m, r, cfg.bank.init)
    with phase(timings, "warm_start", device):
        if spectra and r <= spectra["factors"].shape[1]:                    # reuse the solver's SVDs
            targets = align_factors(spectra["factors"], spectra["cov"], r, cfg.train.chunk_size)
        else:
            targets = aligned_targets(weights, norm, r, cfg.train.chunk_size, device)
        spectra.clear()
        starts = [warm_start(targets, m, cfg, gen) for _ in range(cfg.train.restarts)]
        del targets                                                         # [N, r, d]: freed before AM
    with phase(timings, "am_varpro", device):
        state, bank, codes, history = alternate(weights, norm, starts, cfg, family)
    fitted = (bank, *finalize(weights, norm, codes, bank, cfg.bank.phi, cfg))
    if cfg.train.refine_steps > 0:
        with phase(timings, "refine", device):
            fitted, history["refine"] = refine_or_keep(weights, norm, fitted, cfg, state.temperature, gen, family)
    bank, adapters, codes, sq_err = fitted
    fam = FamilyFit(family=family, bank=bank, codes=codes, adapters=norm.fold(adapters), scales=norm.scales,
                    ids=ids, phi=cfg.bank.phi, history=history)
    fam.metrics = family_metrics(fam, sq_err, norm, timings)
    log.info("%s: rel_err %.4f, median support %.1f, %d stored params (%.1f%% of dense)", family,
             fam.metrics["rel_err"], fam.metrics["median_support"], fam.metrics["params"]["stored"],
             100 * fam.metrics["params"]["stored"] / fam.metrics["params"]["dense"])
    return fam


def alternate(weights, norm: Normalizer, starts: list[tuple], cfg: FitConfig, family: str):
    """Alternating minimisation + variable projection from each warm start (bank, codes, temperature).

    Returns (AM state, bank, codes, history) of the attempt with the lowest final error.
    """
    best = None
    for attempt in range(len(starts)):
        bank, codes, temp = starts[attempt]
        starts[attempt] = None                                              # the state owns it now
        state = AMState(bank=bank, codes=codes, temperature=temp)
        history: dict = {"am": state.history, "varpro": []}
        for _ in range(cfg.train.cycles):
            state.iteration, state.best_err, state.best_bank, state.best_codes = 0, math.inf, None, None
            run_am(weights, norm, state, cfg, family)
            bank, codes = best_state(weights, norm, state, cfg)
            err = state.best_err
            if cfg.train.varpro_steps > 0:
                bank, codes, losses = varpro_refine(weights, norm, bank, codes, cfg, cfg.train.varpro_steps,
                                                    state.temperature)
                bank, codes = normalize_atoms(bank, codes)
                history["varpro"] += losses
                err = losses[-1]
            state.bank, state.codes = bank, codes
        log.debug("%s start %d: rel_err %.5f", family, attempt, err)
        if best is None or err < best[0]:
            best = (err, state, bank, codes, {k: v for k, v in history.items() if v})
    return best[1:]


def refine_or_keep(weights, norm: Normalizer, fitted: tuple, cfg: FitConfig, temperature: float, gen,
                   family: str) -> tuple[tuple, list[float]]:
    """Adam refinement of (bank, adapters, codes, sq_err); rolled back with a warning if it raised the error."""
    bank, adapters, codes, sq_err = fitted
    new_bank, new_codes, _, history = adam_refine(weights, norm, bank, codes, adapters, cfg, temperature, gen)
    new_bank, new_codes = normalize_atoms(new_bank, prune(new_codes, cfg))
    refined = (new_bank, *finalize(weights, norm, new_codes, new_bank, cfg.bank.phi, cfg))
    if _rel(refined[3], norm) <= _rel(sq_err, norm):
        return refined, history
    log.warning("%s: Adam refinement raised the error (%.5f -> %.5f): rolled back", family, _rel(sq_err, norm),
                _rel(refined[3], norm))
    return fitted, history


def prune(codes: torch.Tensor, cfg: FitConfig) -> torch.Tensor:
    keep = codes.abs() >= cfg.sparsity.eps * codes.abs().amax(-1, keepdim=True)
    return torch.where(keep, codes, torch.zeros_like(codes))


def best_state(weights, norm: Normalizer, state: AMState, cfg: FitConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The final AM state, or the best one seen if the last iterations made the error worse (best_err updated)."""
    _, _, sq_err = finalize(weights, norm, state.codes, state.bank, "identity", cfg)
    final = _rel(sq_err, norm)
    if state.best_bank is None or final <= state.best_err:
        state.best_err = final
        return state.bank, state.codes
    return state.best_bank, state.best_codes


def family_metrics(fam: FamilyFit, sq_err: torch.Tensor, norm: Normalizer, timings: dict) -> dict:
    out = {**error_metrics(sq_err, norm.sq_norms, fam.ids), **code_metrics(fam.codes), **bank_metrics(fam.bank)}
    out.update(params=fam.param_count(), shape=fam.shape, weight_mean_abs_max=float(norm.means.abs().max()),
               am_iterations=len(fam.history.get("am", [])), timings=timings,
               seconds=round(sum(t["seconds"] for t in timings.values()), 3), peak_mem_mb=peak_memory_mb())
    if fam.history.get("am"):
        out["am_final_rel_err"] = fam.history["am"][-1]["rel_err"]
        out["final_temperature"] = fam.history["am"][-1]["temperature"]
    if fam.history.get("varpro"):
        out["varpro_evaluations"] = len(fam.history["varpro"])
    return out


def fit_model(model_dir: str | Path, cfg: FitConfig | None = None, done: dict[str, FamilyFit] | None = None,
              on_family: Callable[[FamilyFit], None] | None = None) -> FitResult:
    """Fit every configured family of the checkpoint in model_dir (see globe.io for supported layouts).

    Family k is seeded with cfg.train.seed + k, so a family fitted in a resumed run equals an uninterrupted
    one. `done` holds families already fitted (resume); on_family(fam) is called after each new family.
    """
    from globe.io import open_checkpoint
    cfg = (cfg or FitConfig()).validate()
    families, t0 = dict(done or {}), time.perf_counter()
    with open_checkpoint(model_dir) as reader:
        inventory = reader.inventory()
        for k, family in enumerate(cfg.bank.families):
            if family in families:
                log.info("%s: taken from checkpoint", family)
                continue
            stack = reader.read_family(family, lazy=True)              # experts read chunk by chunk, never all
            gen = torch.Generator().manual_seed(cfg.train.seed + k)
            families[family] = fit_family(stack.weights, stack.ids, cfg, family, gen)
            del stack
            if on_family is not None:
                on_family(families[family])
    source = {"model_dir": str(Path(model_dir).resolve()), "model_type": inventory.model_type,
              "inventory": inventory.to_dict()}
    return FitResult(families={f: families[f] for f in cfg.bank.families}, config=cfg, source=source,
                     timings={"total_seconds": round(time.perf_counter() - t0, 3)})
