"""Real-instrument drivers, each implementing the :class:`labep.hardware.bench.Bench` contract.

Installed as ``labep.drivers``. A driver never opens hardware by itself: it receives its
transport (a pyvisa resource, a ``serial_for_url`` port) from a resource string, so tests swap
the transport, not the driver.
"""
