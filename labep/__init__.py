"""labep: hardware-in-the-loop Equilibrium Propagation for lab benches and their simulators."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("labep")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
