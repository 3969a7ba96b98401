"""Equilibrium Propagation's host-side math: gradient estimators over read-back states,
finite-temperature helpers and exact references, and the optimizers that turn an estimate
into a step."""
