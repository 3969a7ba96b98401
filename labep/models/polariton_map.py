"""The picture of a polariton lattice's parameters for ``labep report``: the potentials V_i
on the chain or grid, input sites dotted, class regions framed (matplotlib, imported only
when a report is drawn)."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.axes import Axes

from labep.models.polariton_config import site_regions


def draw_lattice_map(ax: Axes, model: dict[str, Any], params: dict[str, np.ndarray]) -> None:
    """The potentials V_i of a polariton lattice (``model``: the protocol's model section) as
    an image of the chain or grid, input sites dotted, each class region framed in its colour."""
    lattice = [int(n) for n in model["lattice"]]
    rows, cols = (1, lattice[0]) if len(lattice) == 1 else lattice
    image = ax.imshow(np.asarray(params["V"], dtype=float).reshape(rows, cols), cmap="viridis",
                      interpolation="nearest", aspect="equal")
    ax.figure.colorbar(image, ax=ax, label="V (J)", shrink=0.8)
    inputs = sorted({int(s) for key in ("input_sites", "inverted_input_sites")
                     for region in site_regions(model.get(key) or [], "input") for s in region})
    if inputs:
        ax.plot(np.mod(inputs, cols), np.floor_divide(inputs, cols), "o", ms=3, mfc="w",
                mec="k", mew=0.5, label="input sites")
    for k, site in enumerate(site_regions(model.get("output_sites", []), "output")):
        ax.plot(site % cols, site // cols, "s", mfc="none", ms=7, mew=1.2,
                color=f"C{k % 10}", label=f"class {k}")
    ax.set(title="potentials V on the lattice (columns across, rows down)")
    if rows <= 12:
        ax.set_yticks(np.arange(rows))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize="x-small", ncols=6)
