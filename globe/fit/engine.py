"""fit_family: normalise -> warm start -> alternating minimisation -> (refine) -> fold back, for one family.
fit_model: stream each family of a checkpoint through fit_family. Returns tensors and metrics, writes nothing."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from globe import tracking
from globe.device import acc_dtype, resolve_device  # noqa: F401  (resolve_device re-exported)
from globe.errors import ConfigError
from globe.fit.activation import activation_metrics, activation_stage, family_whitener, fit_spaces
from globe.fit.adapters import compose, refit_adapters
from globe.fit.am import AMState, run_am
from globe.fit.budget import candidate_shapes, choose_shape
from globe.fit.config import FitConfig
from globe.fit.distributed import LOCAL, Comm
from globe.fit.metrics import bank_metrics, code_metrics, error_metrics, peak_memory_mb, phase
from globe.fit.normalize import Normalizer
from globe.fit.progress import Attempt, FitProgress, FitStore
from globe.fit.mod import normalize_atoms
from globe.fit.refine import adam_refine, varpro_refine
from globe.fit.result import FamilyFit, FitResult
from globe.fit.sharding import check_sharded, gather_fit, read_shard, shared_warm_start
from globe.fit.warm_start import align_factors, aligned_targets, expert_factors

log = logging.getLogger(__name__)


def gram64(x: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """x @ x.T in fp64 (fp32 on MPS) for x [N, D]: at once for fp32 x, by row blocks (upcast per block) for
    narrower x."""
    acc = acc_dtype(x.device)
    if x.dtype == torch.float32:
        return x.to(acc) @ x.to(acc).T
    n = x.shape[0]
    out = torch.empty(n, n, dtype=acc, device=x.device)
    for lo in range(0, n, chunk):
        xi = x[lo:lo + chunk].to(acc)
        for lo2 in range(0, lo + chunk, chunk):
            block = xi @ x[lo2:lo2 + chunk].to(acc).T
            out[lo:lo + chunk, lo2:lo2 + chunk] = block
            out[lo2:lo2 + chunk, lo:lo + chunk] = block.T
    return out


def _probe_ranks(n: int, p: int, d: int, cfg: FitConfig) -> tuple[list, list[int]]:
    """(candidate (m, r) shapes, up to 5 ranks spread over them) for the budget solver."""
    b = cfg.bank
    cands = candidate_shapes(n, p, d, b.budget, cfg.sparsity.target_support)
    if b.r is not None:
        cands = [(m, r) for m, r in cands if r == b.r] or cands
    grid = sorted({r for _, r in cands})
    return cands, grid[:: max(1, len(grid) // 4)][:5]


def pick_shape(weights: torch.Tensor, norm: Normalizer, cfg: FitConfig, device, comm: Comm = LOCAL,
               spectra: dict | None = None) -> tuple[int, int]:
    """(m, r) from the config, or chosen on the data to meet cfg.bank.budget.

    The per-expert SVDs are computed once (expert_factors) for every probed rank; pass a dict as `spectra` to
    get them back ("factors", "cov") for the warm start. Distributed: each rank factors its experts, the
    covariance is all-reduced, rank 0 chooses from the gathered spectra and stacked targets and broadcasts.
    """
    (n, p, d), b, k = weights.shape, cfg.bank, cfg.sparsity.target_support
    if b.m is not None and b.r is not None:
        return b.m, b.r
    n = comm.total(n)
    cands, probe = _probe_ranks(n, p, d, cfg)
    if not probe:                                        # no shape fits: every rank raises the same ConfigError
        return choose_shape(n, p, d, b.budget, k, torch.zeros(n, 0))
    svals, factors, cov = expert_factors(weights, norm, max(probe), cfg.train.chunk_size, device)
    comm.all_reduce(cov)
    svals = comm.gather_rows(svals, n)                                      # [N, min(p, d)] on rank 0
    stacked = {}
    for r in probe:
        x = comm.gather_rows(align_factors(factors, cov, r, cfg.train.chunk_size), n)
        if x is not None:
            stacked[r] = torch.linalg.svdvals(gram64(x.reshape(n, -1))).sqrt().cpu()
        del x
    if spectra is not None:
        spectra.update(factors=factors, cov=cov)
    m, r = choose_shape(n, p, d, b.budget, k, svals, stacked) if comm.is_main else (0, 0)
    if comm.world > 1:
        m, r = comm.broadcast(torch.tensor([m, r])).tolist()
    return (b.m if b.m is not None else m), r


def finalize(weights, norm: Normalizer, codes, bank, phi: str, cfg: FitConfig, whiten=None):
    """Exact adapters for phi(codes @ bank), chunk by chunk, in the normalised space.

    Returns (adapters [N, p, r], codes [N, m], sq_err [N] in the original space). With identity phi the codes
    are put on the simplex and their row sums moved into the adapters. With `whiten` (globe.fit.activation) the
    adapters and sq_err are those of the activation-weighted objective ||(W_i - A_i M_i) L_i||^2.
    """
    n, dev = weights.shape[0], bank.device
    if phi == "identity":
        codes = codes / codes.sum(-1, keepdim=True).clamp_min(1e-30)
    adapters = torch.empty(n, weights.shape[1], bank.shape[1], device=dev)
    sq_err = torch.empty(n, dtype=torch.float64)
    for lo in range(0, n, cfg.train.chunk_size):
        hi = min(lo + cfg.train.chunk_size, n)
        w, mixed = norm.chunk(weights, lo, hi, dev), compose(codes[lo:hi], bank, phi)
        if whiten is not None:
            w, mixed = whiten(w, lo, hi), whiten(mixed, lo, hi)
        fit = refit_adapters(w, mixed, cfg.train.ridge)
        adapters[lo:hi] = fit.adapters
        sq_err[lo:hi] = fit.sq_err.double().cpu() * norm.scales[lo:hi].double() ** 2
    return adapters, codes, sq_err


def _rel(sq_err: torch.Tensor, norm: Normalizer, comm: Comm = LOCAL) -> float:
    return float((comm.all_reduce(sq_err.sum()) / comm.all_reduce(norm.sq_norms.sum())).sqrt())


def fit_family(weights: torch.Tensor, ids: torch.Tensor, cfg: FitConfig, family: str = "gate",
               generator: torch.Generator | None = None, resume: FitProgress | None = None,
               on_progress: Callable[[FitProgress], None] | None = None, comm: Comm = LOCAL,
               whiten=None) -> FamilyFit | None:
    """Fit one family: weights [N, p, d] (any float dtype, kept as stored), ids [N, 2] (layer, expert).

    resume: progress reported by an interrupted fit of the same data and config (see globe.fit.progress);
    on_progress(progress) is called at every checkpoint (single process only).
    Distributed (comm a DistComm): weights/ids are this rank's contiguous slice comm.shard(N); rank 0 returns
    the FamilyFit of all experts, the other ranks None.
    whiten: a globe.fit.activation.Whitener for an activation-aware fit (see fit_spaces, activation_stage)."""
    cfg.validate().check_dims(*weights.shape)
    check_sharded(cfg, comm, weights.shape[0])
    if comm.world > 1 and (resume is not None or on_progress is not None):
        raise ConfigError("checkpoints within a family are not supported in a distributed fit")
    if comm.world > 1 and whiten is not None:
        raise ConfigError("activation-aware fitting (activation.stats) is not supported in a distributed fit yet")
    device = resolve_device(cfg.train.device)
    gen = generator if generator is not None else torch.Generator().manual_seed(cfg.train.seed)
    timings: dict = {}
    original = weights
    weights, base, factor = fit_spaces(weights, whiten, cfg) if whiten is not None else (weights, weights, None)
    with phase(timings, "normalize", device):
        names = [f"{family} of layer {int(l)} expert {int(e)}" for l, e in ids.tolist()]
        norm = Normalizer.fit(base, cfg.train.chunk_size, names)
    with phase(timings, "shape", device):
        spectra: dict = {}
        m, r = pick_shape(base, norm, cfg, device, comm, spectra)
    log.info("fitting %s: N=%d p=%d d=%d with m=%d r=%d (%s init)%s", family, comm.total(weights.shape[0]),
             *weights.shape[1:], m, r, cfg.bank.init, f" on {comm.world} processes" if comm.world > 1 else "")
    gen_start, cached = gen.get_state(), []

    def starts() -> list:
        """Every restart's warm start, computed on first need (not at all on a late resume) from the generator's
        state at the start of the family, so a resumed fit draws exactly what an uninterrupted one did."""
        if not cached:
            with phase(timings, "warm_start", device):
                if spectra and r <= spectra["factors"].shape[1]:            # reuse the solver's SVDs
                    targets = align_factors(spectra["factors"], spectra["cov"], r, cfg.train.chunk_size)
                else:
                    targets = aligned_targets(base, norm, r, cfg.train.chunk_size, device, comm)
                spectra.clear()
                gen.set_state(gen_start)
                cached.extend(shared_warm_start(targets, m, cfg, gen, comm) for _ in range(cfg.train.restarts))
                del targets                                                 # [N, r, d]: freed before AM
        return cached

    if resume is not None:
        if resume.gen_state is not None:
            gen.set_state(resume.gen_state)
        resume = resume.to(device)
        log.info("%s: resuming at restart %d, cycle %d, phase %s", family, resume.attempt, resume.cycle, resume.phase)
    if resume is None or resume.phase == "warm_start" or resume.attempt + 1 < cfg.train.restarts:
        starts()                                     # now, from the solver's SVDs, so the targets go before AM
    spectra.clear()
    with phase(timings, "am_varpro", device):
        best = alternate(base, norm, starts, cfg, gen, family, resume, on_progress, comm)
        cached.clear()
    bank, codes, history = best.bank, best.codes, dict(best.history)
    if whiten is not None:
        del base
        with phase(timings, "activation", device):
            bank, codes, norm, history["activation"] = activation_stage(weights, names, bank, codes, factor, cfg,
                                                                        best.temperature, whiten)
    fitted = (bank, *finalize(weights, norm, codes, bank, cfg.bank.phi, cfg, whiten))
    if cfg.train.refine_steps > 0:
        with phase(timings, "refine", device):
            fitted, history["refine"] = refine_or_keep(weights, norm, fitted, cfg, best.temperature, gen, family,
                                                       comm, whiten)
            tracking.emit("refine", family=family, steps=len(history["refine"]), loss=(history["refine"] or [None])[-1])
    bank, adapters, codes, sq_err = fitted
    adapters = norm.fold(adapters) if whiten is None else whiten.unscale_rows(norm.fold(adapters))
    gathered = gather_fit(comm, norm, adapters, codes, sq_err, ids)
    if gathered is None:
        return None
    norm, adapters, codes, sq_err, ids = gathered
    fam = FamilyFit(family=family, bank=bank.cpu(), codes=codes.cpu(), adapters=adapters.cpu(), scales=norm.scales,
                    ids=ids, phi=cfg.bank.phi, history=history)                 # results on the CPU
    fam.metrics = family_metrics(fam, sq_err, norm, timings)
    if whiten is not None:
        fam.metrics.update(activation_metrics(fam, original, weights, sq_err, whiten, cfg.train.chunk_size))
    tracking.emit("family_done", family=family, **{k: v for k, v in fam.metrics.items() if k != "rel_err_per_expert"})
    log.info("%s: rel_err %.4f, median support %.1f, %d stored params (%.1f%% of dense)", family,
             fam.metrics["rel_err"], fam.metrics["median_support"], fam.metrics["params"]["stored"],
             100 * fam.metrics["params"]["stored"] / fam.metrics["params"]["dense"])
    return fam


def alternate(weights, norm: Normalizer, starts: Callable[[], list[tuple]], cfg: FitConfig, gen, family: str,
              resume: FitProgress | None = None, on_progress: Callable[[FitProgress], None] | None = None,
              comm: Comm = LOCAL) -> Attempt:
    """Alternating minimisation + variable projection from each restart's warm start (starts()[k] = (bank, codes,
    temperature)).

    Returns the attempt with the lowest final error. Progress is reported every train.checkpoint_every AM
    iterations and after each phase; given such a progress (resume), the result equals an uninterrupted run's.
    """
    t = cfg.train
    prog = resume or FitProgress(attempt=0, cycle=0, phase="warm_start", state=None)

    def report() -> None:
        if on_progress is not None:
            prog.gen_state = gen.get_state()
            on_progress(prog)

    def every(state: AMState) -> None:
        if t.checkpoint_every > 0 and state.iteration % t.checkpoint_every == 0:
            report()

    while prog.attempt < t.restarts:
        if prog.state is None:                                   # a new attempt starts from a warm start
            bank, codes, temp = starts()[prog.attempt]
            starts()[prog.attempt] = None                            # the state owns it now
            prog.state, prog.cycle, prog.phase, prog.varpro = AMState(bank, codes, temp), 0, "cycle_start", []
        state = prog.state
        while prog.cycle < t.cycles:
            if prog.phase == "cycle_start":
                state.iteration, state.best_err, state.best_bank, state.best_codes = 0, math.inf, None, None
                prog.phase = "am"
            if prog.phase == "am":
                run_am(weights, norm, state, cfg, family, on_iteration=every, comm=comm)
                prog.phase = "varpro"
                report()
            bank, codes = best_state(weights, norm, state, cfg, comm)
            prog.err = state.best_err
            if t.varpro_steps > 0:
                bank, codes, losses = varpro_refine(weights, norm, bank, codes, cfg, t.varpro_steps, state.temperature,
                                                    comm)
                bank, codes = normalize_atoms(bank, codes)
                prog.varpro += losses
                prog.err = losses[-1] if losses else prog.err
                tracking.emit("varpro", family=family, evaluations=len(losses), rel_err=prog.err)
            state.bank, state.codes = bank, codes
            prog.cycle, prog.phase = prog.cycle + 1, "cycle_start"
            report()
        log.debug("%s start %d: rel_err %.5f", family, prog.attempt, prog.err)
        if prog.best is None or prog.err < prog.best.err:
            history = {k: v for k, v in {"am": state.history, "varpro": prog.varpro}.items() if v}
            prog.best = Attempt(prog.err, state.bank, state.codes, state.temperature, history)
        prog.attempt, prog.state, prog.cycle = prog.attempt + 1, None, 0
        prog.phase = "warm_start" if prog.attempt < t.restarts else "done"
        prog.varpro, prog.err = [], math.inf
        report()
    return prog.best


def refine_or_keep(weights, norm: Normalizer, fitted: tuple, cfg: FitConfig, temperature: float, gen,
                   family: str, comm: Comm = LOCAL, whiten=None) -> tuple[tuple, list[float]]:
    """Adam refinement of (bank, adapters, codes, sq_err); rolled back with a warning if it raised the error."""
    bank, adapters, codes, sq_err = fitted
    new_bank, new_codes, _, history = adam_refine(weights, norm, bank, codes, adapters, cfg, temperature, gen, comm,
                                                  whiten)
    new_bank, new_codes = normalize_atoms(new_bank, prune(new_codes, cfg))
    refined = (new_bank, *finalize(weights, norm, new_codes, new_bank, cfg.bank.phi, cfg, whiten))
    before, after = _rel(sq_err, norm, comm), _rel(refined[3], norm, comm)
    if after <= before:
        return refined, history
    log.warning("%s: Adam refinement raised the error (%.5f -> %.5f): rolled back", family, before, after)
    return fitted, history


def prune(codes: torch.Tensor, cfg: FitConfig) -> torch.Tensor:
    keep = codes.abs() >= cfg.sparsity.eps * codes.abs().amax(-1, keepdim=True)
    return torch.where(keep, codes, torch.zeros_like(codes))


def best_state(weights, norm: Normalizer, state: AMState, cfg: FitConfig,
               comm: Comm = LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
    """The final AM state, or the best one seen if the last iterations made the error worse (best_err updated)."""
    _, _, sq_err = finalize(weights, norm, state.codes, state.bank, "identity", cfg)
    final = _rel(sq_err, norm, comm)
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


def fit_model(model_dir: str | Path, cfg: FitConfig | None = None, store: FitStore | None = None,
              comm: Comm = LOCAL) -> FitResult | None:
    """Fit every configured family of the checkpoint in model_dir (see globe.io for supported layouts).

    Family k is seeded with cfg.train.seed + k. With a store (globe.checkpoint.CheckpointStore), finished
    families are taken from it, a family in progress continues from its last checkpoint, and new progress and
    families are saved to it: a resumed run's result equals an uninterrupted one's, bit for bit.
    Distributed (comm from globe.fit.distributed.init_comm; no store): each rank reads and fits its slice of the
    experts; rank 0 returns the FitResult, the other ranks return None.
    """
    from globe.calibration import check_stats_fit, load_stats
    from globe.io import open_checkpoint
    cfg = (cfg or FitConfig()).validate()
    families: dict[str, FamilyFit] = {}
    t0 = time.perf_counter()
    stats = load_stats(cfg.activation.stats) if cfg.activation.stats else None
    with open_checkpoint(model_dir) as reader:
        inventory = reader.inventory()
        cfg.check_dims(len(inventory.moe_layers) * inventory.num_experts, inventory.p, inventory.d)
        if stats is not None:
            check_stats_fit(stats, inventory, cfg.activation.stats)
        content = reader.content_hash()
        for k, family in enumerate(cfg.bank.families):
            fam = store.finished(family) if store is not None else None
            if fam is not None:
                log.info("%s: taken from checkpoint", family)
                families[family] = fam
                continue
            stack = read_shard(reader, family, comm)        # one process: lazy, experts read chunk by chunk
            gen = torch.Generator().manual_seed(cfg.train.seed + k)
            resume = store.progress(family) if store is not None else None
            save = (lambda prog, f=family: store.save_progress(f, prog)) if store is not None else None
            whiten = family_whitener(stats, family, stack, cfg.activation) if stats is not None else None
            families[family] = fit_family(stack.weights, stack.ids, cfg, family, gen, resume, save, comm, whiten)
            del stack
            if store is not None and families[family] is not None:
                store.save_family(families[family])
    if not comm.is_main:
        return None
    source = {"model_dir": str(Path(model_dir).resolve()), "model_type": inventory.model_type,
              "content_hash": content, "inventory": inventory.to_dict()}
    return FitResult(families={f: families[f] for f in cfg.bank.families}, config=cfg, source=source,
                     timings={"total_seconds": round(time.perf_counter() - t0, 3)})
