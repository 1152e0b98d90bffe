"""Named numerical constants of the fit engine, each with the reason for its value.

They are not user options (FitConfig holds those): changing one changes the numerics of every fit, so each is
defined once, here, and read by the module that uses it.
"""
from __future__ import annotations

# --- sizes from which the large-model code paths switch on --------------------------------------------------------
LARGE_MATRIX = 2**20            # p * d of one expert from which (a) the warm start uses a randomised top-r SVD and
                                # (b) precision="auto" uses bf16 products on bf16 checkpoints (both pay off there)
LARGE_TARGETS_BYTES = 2**30     # fp32 aligned targets above this are stored in bf16 (the warm start needs them coarse)

# --- sparse coding ------------------------------------------------------------------------------------------------
TEMPERATURE_RETRIES = 8         # re-codes of one chunk while its median support is off target by more than 1
NNLS_SWEEPS = 4                 # active-set sweeps of the support NNLS (supports are small: 4 drops suffice)


def support_cap(target_support: int) -> int:
    """Most atoms the weighted coder keeps per expert: 4k + 4 bounds the [c, k, k] support Grams while leaving
    the temperature controller room to overshoot the target k."""
    return 4 * target_support + 4


# --- dictionary update --------------------------------------------------------------------------------------------
MOD_CG_ITERS = 12               # preconditioned CG iterations of the weighted MOD (warm-started: a few suffice)
MOD_CG_RTOL = 1e-6              # CG stops once the residual is this far below the right-hand side

# --- warm start ---------------------------------------------------------------------------------------------------
SHAPE_PROBES = 5                # ranks probed by the budget solver (spread over the candidate grid)
KSVD_SWEEPS = 2                 # K-SVD sweeps after the greedy / hybrid warm starts

# --- variable projection (L-BFGS) ---------------------------------------------------------------------------------
LBFGS_MAX_HISTORY = 20          # history length, fewer for large banks (see LBFGS_HISTORY_BYTES)
LBFGS_HISTORY_BYTES = 2 * 2**30  # L-BFGS keeps 2 fp32 vectors of all parameters per history entry
LBFGS_TOLERANCE_GRAD = 1e-10    # run the full evaluation budget: stop only at a numerically flat point
LBFGS_TOLERANCE_CHANGE = 1e-12

# --- Adam refinement: divergence guard ----------------------------------------------------------------------------
SNAPSHOT_EVERY = 20             # steps between snapshots of the parameters
DIVERGED_FACTOR = 4.0           # a minibatch loss this many times the best seen counts as diverged (losses are noisy)
SNAPSHOT_SLACK = 1.5            # a snapshot is taken only when the loss is within this factor of the best
MAX_ROLLBACKS = 3               # rollbacks (each halving the learning rate) before refinement stops
SPILL_FAMILY_BYTES = 2**30      # a finished family this large (fp32 adapters + bank + codes) waits in the fit's
                                # store on disk, not in RAM, while the next family fits (globe.fit.engine.fit_model)
