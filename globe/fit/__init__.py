"""Fitting GloBE banks, by role:

    engine/       fit_family, fit_model: the stages, the problem, the resumable runner (start reading here)
    objectives/   what is minimised: one registered Objective subclass per module
    warm_starts/  the inits: one registered module each (in-memory and streamed variants, cost)
    solvers/      numerical kernels on tensors: adapters, coding, MOD, AM, VarPro, Adam, nonlinear, budget
    parallel/     Comm and ExpertShard: the only code that knows about other processes
    planning/     the dry run (globe fit --dry-run): memory and time of each phase
    config.py     FitConfig

Kept light on purpose (no re-exports): import from the submodules, e.g. `from globe.fit.engine import fit_model`.
"""
