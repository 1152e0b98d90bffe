"""The numerical kernels of a fit, on plain tensors and a state: adapters, sparse coding, MOD, AM, variable projection (both forms), Adam, the nonlinear fit, the budget solver, metrics."""
