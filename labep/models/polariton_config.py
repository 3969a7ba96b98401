"""The polariton lattice's protocol section (``model: {kind: polariton, ...}``): geometry,
regions, encoding, physics constants and cost of :class:`labep.models.polariton.PolaritonLattice`.

Kept in a module of its own beside the model, whose physics documentation and implicit
differentiation already fill :mod:`labep.models.polariton`; the model imports it.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from labep.protocol.sections import ModelSection, Section


class InitRegion(Section):
    """Initial potentials of some sites of a polariton lattice: V ~ U(low, high) there."""

    sites: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    potential: tuple[float, float] = Field(
        strict=False, description="[low, high], units of J (a YAML list).")


def _flatten_regions(regions: list[int | list[int]]) -> list[int]:
    """Every site of a list of regions (a region is a site or a list of sites), in order."""
    return [site for region in regions
            for site in ([region] if isinstance(region, int) else region)]


class PolaritonConfig(ModelSection):
    """Exciton-polariton lattice (driven-dissipative Gross-Pitaevskii, labep.models.polariton):
    complex fields psi_i on a chain [n] or a grid [rows, cols], trainable local potentials V_i,
    inputs as potentials on the input sites, readout the output sites' intensities."""

    kind: Literal["polariton"]
    lattice: list[PositiveInt] = Field(min_length=1, max_length=2,
                                       description="[n] (chain) or [rows, cols] (grid).")
    inputs: PositiveInt = Field(le=1_000_000, description="Raw input features (the dataset's).")
    input_sites: list[Annotated[int, Field(ge=0)] | list[Annotated[int, Field(ge=0)]]] = Field(
        min_length=1, description="One input region per encoded feature: a site (row-major), "
        "or a list of sites that all display the feature.")
    inverted_input_sites: (list[Annotated[int, Field(ge=0)] | list[Annotated[int, Field(ge=0)]]]
                           | None) = Field(
        None, min_length=1, description="Optional: one more region per encoded feature that "
        "displays it inverted, -u x_k (a differential display; the input pump is not applied "
        "there).")
    output_sites: list[Annotated[int, Field(ge=0)] | list[Annotated[int, Field(ge=0)]]] = Field(
        min_length=2, description="One output region per class: a site, or a list of sites "
        "whose intensities |psi|^2 are summed (a camera's region of interest).")
    encoding: Literal["direct", "downsample", "pca"] = Field(
        "direct", description="direct: feature k drives input region k; downsample: the "
        "features are an image (image_shape), averaged over pool x pool blocks, row-major; pca: "
        "the first K principal components of the training inputs, standardized (K input "
        "regions).")
    image_shape: list[PositiveInt] | None = Field(None, min_length=2, max_length=2)
    pool: PositiveInt = Field(1, le=64)
    hopping: PositiveFloat = Field(1.0, le=1e3, description="J, the tunnelling (energy unit).")
    interaction: float = Field(1.0, ge=-1e3, le=1e3, description="g, the interaction.")
    pump: float = Field(0.9, ge=0.0, le=1e3, description="P, the non-resonant pump.")
    pump_sites: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="Sites the pump spot covers (None: every site).")
    loss: PositiveFloat = Field(0.3, le=1e3, description="gamma, the loss rate.")
    saturation: PositiveFloat = Field(0.3, le=1e3, description="Gamma, the gain saturation.")
    input_potential: float = Field(1.0, ge=-1e3, le=1e3,
                                   description="u: input site k gets the potential u x_k.")
    input_pump: float = Field(0.0, ge=0.0, le=1e3,
                              description="p_in: input site k gets the extra pump p_in x_k.")
    target_low: float = Field(0.5, ge=0.0, le=1e6,
                              description="Target intensity (or fraction), other classes.")
    target_high: float = Field(2.0, ge=0.0, le=1e6,
                               description="Target intensity (or fraction), the class.")
    init_potential: tuple[float, float] = Field(
        (-0.5, 0.5), strict=False, description="V ~ U(low, high) (a YAML list).")
    init_regions: list[InitRegion] = Field(
        [], description="Sites drawn from their own range instead, in order (walls, wells).")
    cost: Literal["intensity", "fraction", "fraction_hinge", "cross_entropy"] = Field(
        "intensity", description="intensity: 1/2 sum (n_k - t_k)^2; fraction: 1/2 sum (f_k - "
        "t_k)^2 with f_k = n_k / sum_j n_j; fraction_hinge: the same, but the class's region "
        "costs nothing above target_high nor the others below target_low; cross_entropy: "
        "-sum t_k log f_k (targets 0 and 1). The last three are blind to the total intensity "
        "(EP exact with the intensity projection).")
    projection: Literal["none", "uniform", "intensity"] = Field(
        "intensity", description="How the EP contrast of V is made to sum to zero (the gauge "
        "identity): along the states' intensity pattern, uniformly, or not at all.")
    energy_relaxation: float = Field(
        0.0, ge=0.0, le=10.0, description="eta, energy relaxation of the generalized GP "
        "(0: none, the bare driven-dissipative equation).")

    @property
    def sizes(self) -> list[int]:
        """[input features, classes], what the dataset checks compare against."""
        return [self.inputs, len(self.output_sites)]

    @property
    def output_site_list(self) -> list[int]:
        """Every output site, region by region."""
        return _flatten_regions(self.output_sites)

    @property
    def input_site_list(self) -> list[int]:
        """Every input site, region by region (then the inverted regions)."""
        return (_flatten_regions(self.input_sites)
                + _flatten_regions(self.inverted_input_sites or []))

    @model_validator(mode="after")
    def _geometry(self) -> PolaritonConfig:
        n_sites = math.prod(self.lattice)
        if n_sites > 65_536:
            raise ValueError("a lattice has at most 65,536 sites (dense gradient checks)")
        inverted = self.inverted_input_sites
        if inverted is not None and len(inverted) != len(self.input_sites):
            raise ValueError(f"inverted_input_sites: {len(inverted)} regions for "
                             f"{len(self.input_sites)} input regions (one per feature)")
        for label, regions in (("input_sites", self.input_sites),
                               ("inverted_input_sites", inverted or []),
                               ("output_sites", self.output_sites)):
            if any(isinstance(region, list) and not region for region in regions):
                raise ValueError(f"{label}: a region has no sites")
        for number, region in enumerate(self.init_regions):
            if max(region.sites) >= n_sites:
                raise ValueError(f"init_regions[{number}]: sites are 0 .. {n_sites - 1}, got "
                                 f"{max(region.sites)}")
        for label, sites in (("input_sites", self.input_site_list),
                             ("output_sites", self.output_site_list),
                             ("pump_sites", self.pump_sites or [0])):
            if max(sites) >= n_sites:
                raise ValueError(f"{label}: sites are 0 .. {n_sites - 1}, got {max(sites)}")
            if len(set(sites)) != len(sites):
                raise ValueError(f"{label}: a site appears twice")
        if self.encoding == "direct":
            encoded = self.inputs
        elif self.encoding == "pca":
            if len(self.input_sites) > self.inputs:
                raise ValueError(f"pca keeps at most the {self.inputs} inputs as components, "
                                 f"not {len(self.input_sites)} input regions")
            encoded = len(self.input_sites)
        else:
            shape = self.image_shape
            if (shape is None or shape[0] * shape[1] != self.inputs or shape[0] % self.pool
                    or shape[1] % self.pool):
                raise ValueError("downsample needs image_shape [rows, cols] holding the inputs, "
                                 "each divisible by pool")
            encoded = (shape[0] // self.pool) * (shape[1] // self.pool)
        if encoded != len(self.input_sites):
            raise ValueError(f"the {self.encoding} encoding gives {encoded} features for "
                             f"{len(self.input_sites)} input regions")
        return self


def site_regions(entries: list | tuple, label: str) -> list[np.ndarray]:
    """Regions as site arrays: each entry is a site (a region of one) or a list of sites."""
    regions = [np.atleast_1d(np.asarray(entry, dtype=np.int64)) for entry in entries]
    if any(region.size == 0 for region in regions):
        raise ValueError(f"an {label} region has no sites")
    return regions
