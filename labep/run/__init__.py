"""Running a protocol: validate it against the registry, assemble what a run needs once, and
run it (training, gradient checks)."""
