"""Benches and what the host does to them: the Bench contract, the write path (shadow
parameters, codes, calibration, verify), calibration records, the fault policy, and the
signal handling that keeps a parameter write whole."""
