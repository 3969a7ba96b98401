"""Numba simulators of lab benches, each implementing the :class:`labep.hardware.bench.Bench`
contract.

Installed as ``labep.simulators``. Every imperfection a simulator models is a documented
option field, off unless a protocol turns it on; every simulator is deterministic given a seed.
"""
