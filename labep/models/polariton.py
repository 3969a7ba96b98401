"""Exciton-polariton lattice: near-equilibrium EP in a driven-dissipative Gross-Pitaevskii
system with trainable local potentials (Sajnok and Matuszewski 2025).

A lattice (a 1-D chain or a 2-D grid) of complex condensate fields psi_i, nearest neighbours
nn(i) coupled by tunnelling J, follows the discretized generalized Gross-Pitaevskii equation

    i d(psi_i)/dt = -J sum_{j in nn(i)} psi_j + (V_i + U_i(x) + g |psi_i|^2) psi_i
                    + (i/2) (P_i - gamma - Gamma |psi_i|^2) psi_i

with g the polariton interaction, P_i the non-resonant pump (P on the ``pump_sites``, every
site by default, plus an optional input pump), gamma the loss rate and Gamma the gain
saturation. Energies and rates are in the model's energy unit (J = ``hopping`` of them, 1 by
default), time in its inverse, the field in sqrt(polaritons per site) (|psi_i|^2 is the site's
intensity).

Optional energy relaxation eta (``energy_relaxation``, the phenomenological term of generalized
Gross-Pitaevskii models, Wouters and Carusotto): in the frame rotating at the condensate's
frequency mu the conservative part relaxes, i d(psi)/dt = (1 - i eta)(dE/d(psi*) - mu psi) +
(i/2)(P_i - gamma - Gamma |psi|^2) psi. eta = 0 (the default) is the equation above; eta > 0
damps every excitation of the condensate at a rate eta times its energy, which makes the
lowest-energy stationary state the attractor (the stationary states themselves are those of
the eta = 0 equation with renormalized constants).

Trainable parameters: the local potentials V_i of every site (``V``, shape (n_sites,)), written
optically (a spatial light modulator shaping a non-resonant beam).

Inputs (the encoding): a potential on the input sites, U_i(x) = u * x_k on every site of the
k-th input region (a site, or a list of sites showing the same feature: a larger spot, or one
feature displayed in several places; u the ``input_potential``, x_k in [0, 1] the k-th encoded
feature; 0 elsewhere), displayed by
the same light modulator on top of V (and, optionally, an extra pump p_in * x_k there,
``input_pump``, 0 by default). Optionally each feature also has an inverted region
(``inverted_input_sites``, one per input region) that displays -u * x_k: a differential
display, with which the light a class region draws from the sites of feature k weighs x_k
with either sign (a region's density is positive, so without it the weights of the features
in a region's energy shift u sum_k rho(k) x_k are all positive). ``encoding`` ``direct``
takes the raw features as they are; ``downsample`` reads the raw features as an image
(``image_shape``) and averages ``pool`` x ``pool`` blocks (an 8 x 8 digit becomes 4 x 4
features with pool 2), row-major;
``pca`` projects the raw features on the first K principal directions of the training inputs
(K the number of input regions) and standardizes them (z_k of mean 0 and unit variance over
the training set, so the potentials u z_k take both signs): :meth:`PolaritonLattice.
fit_encoding`, which the engine calls with the training split whenever it builds the model
(the fit is deterministic, so a resumed run encodes as the first one did).

Energy. Without dissipation the equation is i d(psi)/dt = dE/d(psi*) with the conservative
energy

    E = sum_i sum_{j in nn(i)} -J psi_i* psi_j + sum_i (V_i + U_i) |psi_i|^2 + (g/2) |psi_i|^4,

whose local measurement for V_i is dE/dV_i = |psi_i|^2: the EP contrast of V compares the
intensities of two steady states (a camera image). In the weakly dissipative regime (P, gamma,
Gamma small against J and g) a steady state psi_i(t) = psi_i exp(-i mu t) sits near a
stationary point of E - mu N (N = sum |psi_i|^2) at the frame frequency mu that the gain-loss
balance sum_i (P_i - gamma - Gamma |psi_i|^2) |psi_i|^2 = 0 selects.

Readout and cost: the intensity n_k of output region k (one region per class; a region is a
single site or several, summed like a camera's region of interest; it may hold input sites,
the camera reading the light of a site whose potential the modulator sets), and either

- ``cost: intensity``: C = 1/2 sum_k (n_k - t_k)^2, targets t_k = ``target_high`` for the class
  and ``target_low`` for the others (intensities);
- ``cost: fraction``: C = 1/2 sum_k (f_k - t_k)^2 with f_k = n_k / sum_j n_j the fraction of the
  output light in region k (targets are fractions). Blind to the total intensity, which the
  gain balance sets and a camera's exposure scales; with it EP is exact (below);
- ``cost: fraction_hinge``: the ``fraction`` cost as a squared hinge, C = 1/2 sum_k e_k^2 with
  e_k = min(f_k - t_k, 0) on the class's region and max(f_k - t_k, 0) on the others: the
  class is pushed up to at least ``target_high`` and the others down to at most
  ``target_low``, and a region already past its target costs nothing (``fraction`` pulls an
  over-confident class back to its target, which narrows the margin of every other sample);
- ``cost: cross_entropy``: C = -sum_k t_k log f_k, the categorical cross-entropy of the
  fractions read as class probabilities (targets one-hot: ``target_low`` 0, ``target_high``
  1; other values give soft targets). Blind to the total intensity too. Its nudge step on
  the class's region, beta (sum_j t_j / S - t_k / n_k), grows without bound as that region
  goes dark (n_k -> 0): keep beta small against n_k; a pattern that leaves the modulator's
  range is refused before it is displayed.

The prediction is the brightest output region.

Nudge: a forcing beta dC/d(psi_i*) = beta (dC/dn_k) psi_i on the sites of region k, i.e. a
potential step beta dC/dn_k there. A bench displays it on the light modulator with dC/dn_k
frozen at the start (free) state (:meth:`PolaritonLattice.nudge_potential`), which agrees with
the self-consistent forcing to first order in beta, all EP uses.

State: a read-back state row is the complex field, as (Re psi, Im psi) pairs of the sites in
*readout order* (every non-output site in increasing index, then the output sites region by
region in class order), so that the outputs' fields are the last entries (``output_slice``).
A camera measures the intensities and, interferometrically, the phases.

Settling (:meth:`PolaritonLattice.residual`): in the frame rotating at mu, i d(psi)/dt =
F(mu) = A - mu B with A = (1 - i eta) dE/d(psi*) + (i/2)(P_i - gamma - Gamma |psi|^2) psi and
B = (1 - i eta) psi. The frame frequency is estimated from the state, mu = Re(B^dagger A) /
|B|^2 (for eta = 0 the energy per particle Re(psi^dagger dE/d(psi*)) / N), and the
rotating-frame residual is max_i |F_i(mu)| / sqrt(N / n): zero exactly at a stationary state,
in units of J; it bounds the intensities' rates of change, |d n_i/dt| <= 2 |psi_i| |F_i|. A
condensate that dies (N -> 0) never counts as settled.

Exact gradient (:meth:`PolaritonLattice.exact_gradient`): implicit differentiation of the
stationary state in the rotating frame. The unknowns are (Re psi, Im psi, mu) (2n + 1 reals);
the equations are F(psi, mu) = 0 (2n reals) and a phase-fixing condition Im(psi0^dagger psi) = 0
that removes the U(1) freedom psi -> exp(i a) psi (psi0 the free state). With the Jacobian M of
these 2n + 1 equations and lambda = M^-T dC/dx, dC/dV_i = -lambda . dF/dV_i, where dF_i/dV_i =
(1 - i eta) psi_i. Float64, one dense solve per sample.

How close EP comes. In the weakly dissipative regime the steady state is a stationary point
of E - mu N, and the gain-loss balance B(psi) = sum_i (P_i - gamma - Gamma |psi_i|^2)
|psi_i|^2 = 0 picks mu, i.e. the total intensity N. The EP contrast is exact for a stationary
point of a fixed function; here the nudged state also moves along the one-parameter family of
stationary states (d psi / d mu) to keep B = 0, which adds to the contrast a component along
that family, while the exact gradient needs the adjoint of the balance constraint. Two things
remove the difference:

- a cost blind to the total intensity (``cost: fraction`` or ``cross_entropy``), so that
  the rescaling of the pattern along the family does not enter the exact gradient;
- the ``intensity`` projection of the contrast (:meth:`PolaritonLattice.contrast`), which
  removes the family's component, fixing its size by the gauge identity sum_i dC/dV_i = 0.

Under a uniform pump the two together give the exact gradient (``labep gradcheck``: cosine
1.0000 at g = 0.1 to 3 with energy relaxation 0.5, and at g = 1 and 3 without). With the
``uniform`` projection (remove the mean) a part of the difference stays (cosine ~0.97), and
with the ``intensity`` cost more of it (~0.8 whatever the projection;
``benchmarks/polariton_gradcheck.py`` prints the table over gamma). Far from equilibrium
(strong currents, e.g. a single pumped site feeding the lattice) EP is not exact.

Which regime learns. With energy relaxation (eta ~ 0.5) and weak dissipation the attractor is
the lowest-energy stationary state, whose intensities are nodeless (no destructive
interference), and the repulsive interaction g smooths their response. A double well is its
sharpest nonlinearity: two wells of equal depth share the condensate, a small difference of
depth localizes it in the deeper one. With the inputs on the two wells, a region between them
(lit by both wells' tails) and a region of the two outer flanks (lit by the occupied well)
compare "balanced" with "localized", which is XOR; EP training finds that geometry by itself
(``protocols/polariton_xor.yaml``).

Size: over 400 lines because the physics above (about 130 lines of it) is the reference a
driver author and a reviewer need in one place; the code is the one model class and its
helpers. Its protocol section is :mod:`labep.models.polariton_config`, its report picture
:mod:`labep.models.polariton_map`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from labep.models import Params
from labep.models.polariton_config import PolaritonConfig, site_regions
from labep.protocol.sections import ModelSection


def lattice_neighbours(lattice: tuple[int, ...]) -> np.ndarray:
    """The nearest neighbours nn(i) of every site of a chain (n,) or a grid (rows, cols),
    open boundaries, as an (n_sites, 4) int64 table padded with -1 (sites row-major)."""
    if len(lattice) == 1:
        rows, cols = 1, lattice[0]
    elif len(lattice) == 2:
        rows, cols = lattice
    else:
        raise ValueError(f"a lattice is (n,) or (rows, cols), got {lattice}")
    table = -np.ones((rows * cols, 4), dtype=np.int64)
    for r in range(rows):
        for c in range(cols):
            found = [(r + dr) * cols + (c + dc)
                     for dr, dc in ((-1, 0), (0, -1), (0, 1), (1, 0))
                     if 0 <= r + dr < rows and 0 <= c + dc < cols]
            table[r * cols + c, :len(found)] = found
    return table


def _hinge_excess(fraction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """e = f - t clipped one-sidedly: a class region (its target the row's largest) past its
    target, or another region below its own, is not in excess (the squared hinge's dC/df)."""
    excess = fraction - target
    is_class = target >= target.max(axis=1, keepdims=True)
    return np.where(is_class, np.minimum(excess, 0.0), np.maximum(excess, 0.0))


def _membership(regions: list[np.ndarray], n_sites: int) -> np.ndarray:
    """The (regions, sites) 0/1 matrix whose row k marks the sites of region k."""
    matrix = np.zeros((len(regions), n_sites))
    for k, region in enumerate(regions):
        matrix[k, region] = 1.0
    return matrix


class PolaritonLattice:
    """The polariton model shared by the polariton simulator and the VISA polariton bench.

    Parameter ``V`` (n_sites,), in units of J; a read-back state is the field (see the module
    docstring for the layout)."""

    #: the protocol section this model is built from (``model:``)
    config_model: ClassVar[type[ModelSection]] = PolaritonConfig

    kind = "polariton"

    @staticmethod
    def draw_parameters(ax: Any, section: dict[str, Any], params: dict[str, np.ndarray]
                        ) -> None:
        """``labep report``'s picture of V on the lattice (:mod:`labep.models.polariton_map`)."""
        from labep.models.polariton_map import draw_lattice_map

        draw_lattice_map(ax, section, params)

    def __init__(
        self,
        lattice: list[int] | tuple[int, ...],
        inputs: int,
        input_sites: list[int | list[int]] | tuple[int | list[int], ...],
        output_sites: list[int | list[int]] | tuple[int | list[int], ...],
        *,
        encoding: str = "direct",
        image_shape: list[int] | tuple[int, ...] | None = None,
        pool: int = 1,
        hopping: float = 1.0,
        interaction: float = 1.0,
        pump: float = 0.9,
        pump_sites: list[int] | tuple[int, ...] | None = None,
        loss: float = 0.3,
        saturation: float = 0.3,
        input_potential: float = 1.0,
        input_pump: float = 0.0,
        target_low: float = 0.5,
        target_high: float = 2.0,
        init_potential: list[float] | tuple[float, float] = (-0.5, 0.5),
        init_regions: list[dict] | None = None,
        inverted_input_sites: list[int | list[int]] | tuple[int | list[int], ...] | None = None,
        cost: str = "intensity",
        projection: str = "intensity",
        energy_relaxation: float = 0.0,
    ) -> None:
        self.lattice = tuple(int(n) for n in lattice)
        self.neighbours = lattice_neighbours(self.lattice)
        self.n_sites = int(self.neighbours.shape[0])
        self.input_size = int(inputs)
        #: the sites of each input region (feature k is displayed on every site of region k)
        self.input_regions = site_regions(input_sites, "input")
        #: the sites of each inverted input region (feature k displayed as -u x_k), or none
        self.inverted_regions = ([] if inverted_input_sites is None
                                 else site_regions(inverted_input_sites, "inverted input"))
        if self.inverted_regions and len(self.inverted_regions) != len(self.input_regions):
            raise ValueError(f"{len(self.inverted_regions)} inverted input regions for "
                             f"{len(self.input_regions)} input regions (one per feature)")
        #: every input site, region by region in feature order (then the inverted ones)
        self.input_sites = np.concatenate(self.input_regions + self.inverted_regions)
        #: the sites of each output region (one region per class; a bare site is a region of one)
        self.output_regions = site_regions(output_sites, "output")
        #: every output site, region by region in class order
        self.output_sites = np.concatenate(self.output_regions)
        self.output_size = len(self.output_regions)
        self.state_size = 2 * self.n_sites
        for label, sites in (("input", self.input_sites), ("output", self.output_sites)):
            if sites.size == 0 or sites.min() < 0 or sites.max() >= self.n_sites:
                raise ValueError(f"{label} sites must be 0 .. {self.n_sites - 1}, got "
                                 f"{sites.tolist()}")
            if len(set(sites.tolist())) != sites.size:
                raise ValueError(f"{label} sites repeat: {sites.tolist()}")
        self.encoding = encoding
        self.pool = int(pool)
        self.image_shape = None if image_shape is None else tuple(int(n) for n in image_shape)
        #: the fitted pca encoding (mean, directions, spread), None until fit_encoding
        self.pca: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        n_features = self._encoded_size()
        if n_features != len(self.input_regions):
            raise ValueError(f"the {encoding} encoding gives {n_features} features but there "
                             f"are {len(self.input_regions)} input regions")
        #: (features, sites) 0/1 matrix of the input regions (the input pump's)
        self.pump_matrix = _membership(self.input_regions, self.n_sites)
        #: (features, sites) +1/-1/0 matrix: U(x) = u * x @ input_matrix
        self.input_matrix = self.pump_matrix.copy()
        if self.inverted_regions:
            self.input_matrix -= _membership(self.inverted_regions, self.n_sites)
        self.hopping = float(hopping)
        self.interaction = float(interaction)
        self.pump = float(pump)
        self.pump_sites = (np.arange(self.n_sites) if pump_sites is None
                           else np.asarray(pump_sites, dtype=np.int64))
        if self.pump_sites.size and (self.pump_sites.min() < 0
                                     or self.pump_sites.max() >= self.n_sites):
            raise ValueError(f"pump sites must be 0 .. {self.n_sites - 1}")
        self.loss = float(loss)
        self.saturation = float(saturation)
        self.input_potential = float(input_potential)
        self.input_pump = float(input_pump)
        self.target_low = float(target_low)
        self.target_high = float(target_high)
        self.init_potential = (float(init_potential[0]), float(init_potential[1]))
        #: (sites, (low, high)) pairs: V ~ U(low, high) there instead (walls, wells)
        self.init_regions = [(np.asarray(region["sites"], dtype=np.int64),
                              (float(region["potential"][0]), float(region["potential"][1])))
                             for region in (init_regions or [])]
        for sites, _ in self.init_regions:
            if sites.size == 0 or sites.min() < 0 or sites.max() >= self.n_sites:
                raise ValueError(f"init_regions: sites must be 0 .. {self.n_sites - 1}, got "
                                 f"{sites.tolist()}")
        if cost not in ("intensity", "fraction", "fraction_hinge", "cross_entropy"):
            raise ValueError(f"unknown cost {cost!r}; known: intensity, fraction, "
                             "fraction_hinge, cross_entropy")
        if projection not in ("none", "uniform", "intensity"):
            raise ValueError(f"unknown projection {projection!r}; known: none, uniform, "
                             "intensity")
        self.cost_kind = cost
        self.projection = projection
        self.energy_relaxation = float(energy_relaxation)
        #: (classes, sites) 0/1 matrix: region k's intensity is region_matrix[k] @ |psi|^2
        self.region_matrix = _membership(self.output_regions, self.n_sites)
        outputs = set(self.output_sites.tolist())
        #: site of each readout slot: non-output sites ascending, then the outputs by class
        self.readout_order = np.array(
            [i for i in range(self.n_sites) if i not in outputs] + self.output_sites.tolist(),
            dtype=np.int64)
        #: readout slot of each site (the inverse permutation)
        self.slot_of_site = np.argsort(self.readout_order)

    # -- geometry and encodings -------------------------------------------------------------

    @property
    def sizes(self) -> tuple[int, int]:
        """(input features, classes): what a protocol checks against its dataset."""
        return self.input_size, self.output_size

    @property
    def output_slice(self) -> tuple[int, int]:
        return self.state_size - 2 * len(self.output_sites), self.state_size

    def _encoded_size(self) -> int:
        if self.encoding == "direct":
            return self.input_size
        if self.encoding == "downsample":
            if self.image_shape is None or len(self.image_shape) != 2:
                raise ValueError("the downsample encoding needs image_shape [rows, cols]")
            rows, cols = self.image_shape
            if rows * cols != self.input_size or rows % self.pool or cols % self.pool:
                raise ValueError(f"image_shape {list(self.image_shape)} must hold the "
                                 f"{self.input_size} inputs and divide by pool {self.pool}")
            return (rows // self.pool) * (cols // self.pool)
        if self.encoding == "pca":
            if len(self.input_regions) > self.input_size:
                raise ValueError(f"the pca encoding keeps at most the {self.input_size} raw "
                                 f"features, not {len(self.input_regions)} components")
            return len(self.input_regions)
        raise ValueError(f"unknown encoding {self.encoding!r}; known: direct, downsample, pca")

    def fit_encoding(self, train_inputs: np.ndarray) -> None:
        """Fit the ``pca`` encoding on the training inputs (nothing to fit otherwise): the mean
        m, the first K principal directions p_k (K input regions; SVD of the centred inputs,
        each direction's largest entry made positive, so the fit is deterministic) and the
        standard deviation s_k of each projection; x encodes as z_k = (x - m) . p_k / s_k."""
        if self.encoding != "pca":
            return
        x = np.asarray(train_inputs, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.input_size or len(x) < 2:
            raise ValueError(f"the pca encoding is fitted on (n >= 2, {self.input_size}) "
                             f"training inputs, got {x.shape}")
        mean = x.mean(axis=0)
        _, _, directions = np.linalg.svd(x - mean, full_matrices=False)
        count = len(self.input_regions)
        if directions.shape[0] < count:
            raise ValueError(f"{len(x)} training inputs span fewer than {count} components")
        directions = directions[:count]
        largest = np.argmax(np.abs(directions), axis=1)
        directions *= np.sign(directions[np.arange(count), largest])[:, None]
        spread = np.maximum(((x - mean) @ directions.T).std(axis=0), 1e-12)
        self.pca = (mean, directions, spread)

    def encode(self, inputs: np.ndarray) -> np.ndarray:
        """The features x (batch, n_input_regions) that drive the input regions."""
        x = np.asarray(inputs, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"inputs must be (batch, {self.input_size}), got {x.shape}")
        if self.encoding == "direct":
            return x
        if self.encoding == "pca":
            if self.pca is None:
                raise ValueError("the pca encoding is fitted on the training inputs first "
                                 "(fit_encoding; labep.run.assembly.build_model(section, "
                                 "data))")
            mean, directions, spread = self.pca
            return ((x - mean) @ directions.T) / spread
        assert self.image_shape is not None
        rows, cols = self.image_shape
        p = self.pool
        blocks = x.reshape(len(x), rows // p, p, cols // p, p)
        return blocks.mean(axis=(2, 4)).reshape(len(x), -1)

    def input_potentials(self, inputs: np.ndarray) -> np.ndarray:
        """U(x) (batch, n_sites): u * x_k on every site of the k-th input region, -u * x_k on
        every site of its inverted region (if any), 0 elsewhere (units of J)."""
        return self.input_potential * (self.encode(inputs) @ self.input_matrix)

    def pumps(self, inputs: np.ndarray) -> np.ndarray:
        """P_i (batch, n_sites): the pump P on the pump sites (every site by default), plus
        p_in * x_k on every site of the k-th input region (not on the inverted ones)."""
        features = self.encode(inputs)
        out = self.input_pump * (features @ self.pump_matrix)
        out[:, self.pump_sites] += self.pump
        return out

    def nudge_potential(self, strength: float, target: np.ndarray,
                        start: np.ndarray) -> np.ndarray:
        """The nudge as a potential (batch, n_sites): beta dC/dn_k on every site of output
        region k, with dC/dn_k at the ``start`` state rows (the free state), since the forcing
        beta dC/d(psi_i*) = beta (dC/dn_k) psi_i is that potential times psi_i."""
        out = np.zeros((start.shape[0], self.n_sites))
        if strength != 0.0:
            out += strength * (self.cost_gradient(self.output_intensities(start), target)
                               @ self.region_matrix)
        return out

    # -- state layout -----------------------------------------------------------------------

    def field(self, state: np.ndarray) -> np.ndarray:
        """The complex field psi (batch, n_sites), sites in index order, of state rows."""
        state = np.asarray(state)
        slots = state[:, 0::2] + 1j * state[:, 1::2]
        return slots[:, self.slot_of_site]

    def pack(self, field: np.ndarray, dtype: np.dtype | type = np.float64) -> np.ndarray:
        """State rows (batch, 2 n_sites) of a complex field (batch, n_sites)."""
        ordered = field[:, self.readout_order]
        out = np.empty((field.shape[0], self.state_size), dtype=dtype)
        out[:, 0::2] = ordered.real
        out[:, 1::2] = ordered.imag
        return out

    def intensities(self, state: np.ndarray) -> np.ndarray:
        """|psi_i|^2 (batch, n_sites), sites in index order."""
        state = np.asarray(state)
        slots = state[:, 0::2] ** 2 + state[:, 1::2] ** 2
        return slots[:, self.slot_of_site]

    def output_intensities(self, state: np.ndarray) -> np.ndarray:
        """n_k = sum of |psi_i|^2 over output region k (batch, n_out), by class (a camera's
        region of interest; a single site for a region of one)."""
        return self.intensities(state) @ self.region_matrix.T

    # -- the Model protocol -----------------------------------------------------------------

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"V": (self.n_sites,)}

    def layer_of(self, name: str) -> int:
        if name != "V":
            raise KeyError(name)
        return 1

    def init_params(self, rng: np.random.Generator) -> Params:
        """V ~ U(init_potential), then V ~ U(low, high) on the sites of each init region in
        turn (walls between regions, wells), all from ``rng``."""
        low, high = self.init_potential
        potentials = rng.uniform(low, high, size=self.n_sites)
        for sites, (low, high) in self.init_regions:
            potentials[sites] = rng.uniform(low, high, size=sites.size)
        return {"V": potentials}

    def encode_target(self, labels: np.ndarray) -> np.ndarray:
        target = np.full((len(labels), self.output_size), self.target_low)
        target[np.arange(len(labels)), labels] = self.target_high
        return target

    def predict(self, state: np.ndarray) -> np.ndarray:
        return np.argmax(self.output_intensities(state), axis=1)

    def cost(self, state: np.ndarray, target: np.ndarray) -> np.ndarray:
        """C per sample: 1/2 sum_k (n_k - t_k)^2 (``intensity``), 1/2 sum_k (f_k - t_k)^2
        with f_k = n_k / sum_j n_j the fraction of the output light in region k
        (``fraction``), the same with the excess e_k = f_k - t_k clipped to e_k <= 0 on the
        class (targets at the row's largest) and e_k >= 0 elsewhere (``fraction_hinge``), or
        -sum_k t_k log f_k (``cross_entropy``)."""
        readout = self._readout(self.output_intensities(state))
        if self.cost_kind == "cross_entropy":
            return -np.sum(target * np.log(np.maximum(readout, 1e-300)), axis=1)
        if self.cost_kind == "fraction_hinge":
            return 0.5 * np.sum(_hinge_excess(readout, target) ** 2, axis=1)
        return 0.5 * np.sum((readout - target) ** 2, axis=1)

    def _readout(self, n_out: np.ndarray) -> np.ndarray:
        if self.cost_kind == "intensity":
            return n_out
        return n_out / np.maximum(n_out.sum(axis=1, keepdims=True), 1e-300)

    def cost_gradient(self, n_out: np.ndarray, target: np.ndarray) -> np.ndarray:
        """dC/dn_k (batch, n_out) at output intensities n_out: n_k - t_k (``intensity``), or
        (e_k - sum_j e_j f_j) / S with S = sum_j n_j, e = f - t (``fraction``; e clipped for
        ``fraction_hinge``), or sum_j t_j / S - t_k / n_k (``cross_entropy``). The fraction
        costs are blind to the total intensity: their sums weighted by n are 0."""
        n_out = np.asarray(n_out, dtype=np.float64)
        if self.cost_kind == "intensity":
            return n_out - target
        total = np.maximum(n_out.sum(axis=1, keepdims=True), 1e-300)
        if self.cost_kind == "cross_entropy":
            return (np.sum(target, axis=1, keepdims=True) / total
                    - target / np.maximum(n_out, 1e-300))
        fraction = n_out / total
        excess = (_hinge_excess(fraction, target) if self.cost_kind == "fraction_hinge"
                  else fraction - target)
        return (excess - np.sum(excess * fraction, axis=1, keepdims=True)) / total

    def contrast(
        self,
        inputs: np.ndarray,
        state_a: np.ndarray,
        state_b: np.ndarray,
        weights: np.ndarray | None = None,
        scale: float = 1.0,
    ) -> Params:
        """``scale`` times the weighted batch mean of dE/dV(psi_a) - dE/dV(psi_b), with
        dE/dV_i = |psi_i|^2: a difference of two camera images, projected (``projection``).

        A uniform shift of every V_i only shifts the frame frequency mu (psi -> psi
        exp(-i c t)) and changes no intensity, so the exact gradient sums to zero over the
        sites; the raw contrast does not, because the gain-loss balance changes the total
        intensity N between the two states. Each sample's contrast d is therefore projected
        so that it sums to zero:

        - ``uniform``: d - mean(d), along the uniform direction;
        - ``intensity`` (the default): d - n (sum d / sum n), along the intensity pattern n of
          the two states (their mean, the free state's to O(beta^2)). The nudged state leaves
          the free one along the family of stationary states of E - mu N that the gain
          balance moves along, which rescales n; with a cost blind to the total intensity
          (``cost: fraction``) this removes the whole difference between EP and the exact
          gradient under a uniform pump (``labep gradcheck``: cosine 1.0000 from g = 0.1 to 3);
        - ``none``: the raw contrast.

        The projections use only the two camera images."""
        batch = state_a.shape[0]
        dtype = state_a.dtype
        w = np.full(batch, 1.0 / batch) if weights is None else weights / max(weights.sum(), 1e-300)
        w = w * scale
        intensity_a = self.intensities(state_a).astype(np.float64)
        intensity_b = self.intensities(state_b).astype(np.float64)
        difference = intensity_a - intensity_b
        if self.projection == "uniform":
            difference -= difference.mean(axis=1, keepdims=True)
        elif self.projection == "intensity":
            pattern = 0.5 * (intensity_a + intensity_b)
            total = np.maximum(pattern.sum(axis=1, keepdims=True), 1e-300)
            difference -= pattern * (difference.sum(axis=1, keepdims=True) / total)
        return {"V": np.asarray(w @ difference, dtype=dtype)}

    # -- physics ----------------------------------------------------------------------------

    def potentials(self, inputs: np.ndarray, params: Params) -> np.ndarray:
        """V + U(x) (batch, n_sites)."""
        return np.asarray(params["V"], dtype=np.float64)[None, :] + self.input_potentials(inputs)

    def hopping_sum(self, psi: np.ndarray) -> np.ndarray:
        """sum_{j in nn(i)} psi_j for every site (batch, n_sites)."""
        padded = np.concatenate([psi, np.zeros((psi.shape[0], 1), dtype=psi.dtype)], axis=1)
        return padded[:, self.neighbours].sum(axis=2)  # index -1 picks the zero column

    def energy(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """E = sum -J psi_i* psi_j (ordered neighbour pairs) + (V + U) |psi|^2 + g/2 |psi|^4."""
        psi = self.field(state)
        density = np.abs(psi) ** 2
        kinetic = -self.hopping * np.real(np.sum(np.conj(psi) * self.hopping_sum(psi), axis=1))
        local = np.sum(self.potentials(inputs, params) * density
                       + 0.5 * self.interaction * density ** 2, axis=1)
        return kinetic + local

    def stationarity(self, inputs: np.ndarray, psi: np.ndarray, params: Params
                     ) -> tuple[np.ndarray, np.ndarray]:
        """(F, mu): the stationarity residual F = A - mu B of complex fields psi (batch, n)
        and the frame frequency mu that minimizes |F| (least squares, mu = Re(B^dagger A) /
        |B|^2), with A = (1 - i eta) dE/d(psi*) + (i/2)(P_i - gamma - Gamma |psi|^2) psi and
        B = (1 - i eta) psi: in the frame rotating at mu, i d(psi)/dt = F."""
        density = np.abs(psi) ** 2
        conservative = (-self.hopping * self.hopping_sum(psi)
                        + (self.potentials(inputs, params) + self.interaction * density) * psi)
        gain = 0.5 * (self.pumps(inputs) - self.loss - self.saturation * density)
        turn = 1.0 - 1j * self.energy_relaxation
        a = turn * conservative + 1j * gain * psi
        b = turn * psi
        mu = (np.real(np.sum(np.conj(b) * a, axis=1))
              / np.maximum(np.sum(np.abs(b) ** 2, axis=1), 1e-300))
        return a - mu[:, None] * b, mu

    def residual(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """Rotating-frame residual max_i |F_i| / sqrt(N / n) per sample (units of J; see
        :meth:`stationarity`); infinite where the condensate has died (N / n < 1e-12)."""
        psi = self.field(np.asarray(state, dtype=np.float64))
        stationarity, _ = self.stationarity(inputs, psi, params)
        mean = np.sum(np.abs(psi) ** 2, axis=1) / self.n_sites
        worst = np.max(np.abs(stationarity), axis=1)
        out = np.full(len(psi), math.inf)
        alive = mean >= 1e-12
        out[alive] = worst[alive] / np.sqrt(mean[alive])
        return out

    def stationary_jacobian(self, inputs: np.ndarray, psi: np.ndarray, params: Params
                            ) -> tuple[np.ndarray, np.ndarray]:
        """The Jacobian M (batch, 2n + 1, 2n + 1) of (Re F, Im F, Im(psi0^dagger psi)) with
        respect to (Re psi, Im psi, mu) at stationary fields psi (psi0 = psi), and mu."""
        batch, n = psi.shape
        _, mu = self.stationarity(inputs, psi, params)
        density = np.abs(psi) ** 2
        # F_i = t [-J sum_nb psi_j + a_i psi_i] + i b_i psi_i, t = 1 - i eta,
        # a = V + U + g n - mu, b = (P_i - gamma - Gamma n) / 2, dn_i/dRe psi_i = 2 Re psi_i
        turn = 1.0 - 1j * self.energy_relaxation
        a = self.potentials(inputs, params) + self.interaction * density - mu[:, None]
        b = 0.5 * (self.pumps(inputs) - self.loss - self.saturation * density)
        lattice = np.zeros((n, n))
        for i in range(n):
            for j in self.neighbours[i]:
                if j >= 0:
                    lattice[i, j] = -self.hopping
        jac = np.zeros((batch, 2 * n + 1, 2 * n + 1))
        index = np.arange(n)
        g, big_gamma = self.interaction, self.saturation
        for sample in range(batch):
            p, ai, bi = psi[sample], a[sample], b[sample]
            d_re = np.diag(turn * (ai + 2.0 * g * p.real * p) + 1j * bi
                           - 1j * big_gamma * p.real * p) + turn * lattice
            d_im = np.diag(turn * (1j * ai + 2.0 * g * p.imag * p) - bi
                           - 1j * big_gamma * p.imag * p) + 1j * turn * lattice
            block = jac[sample]
            block[:n, :n], block[n:2 * n, :n] = d_re.real, d_re.imag
            block[:n, n:2 * n], block[n:2 * n, n:2 * n] = d_im.real, d_im.imag
            block[:n, 2 * n], block[n:2 * n, 2 * n] = (-turn * p).real, (-turn * p).imag
            # Im(psi0^dagger psi) = sum Re psi0 Im psi - Im psi0 Re psi
            block[2 * n, index] = -p.imag
            block[2 * n, n + index] = p.real
        return jac, mu

    def exact_gradient(
        self, inputs: np.ndarray, state: np.ndarray, target: np.ndarray, params: Params
    ) -> Params:
        """d(mean C)/dV at the free steady state by implicit differentiation in the rotating
        frame (see the module docstring): lambda = M^-T dC/dx, dC/dV_i = -(lambda_Re,i
        Re psi_i + lambda_Im,i Im psi_i). Float64, one dense solve per sample."""
        params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        psi = self.field(np.asarray(state, dtype=np.float64))
        target = np.asarray(target, dtype=np.float64)
        jac, _ = self.stationary_jacobian(inputs, psi, params)
        batch, n = psi.shape
        # dC/dn_i on every site (dC/dn_k on the sites of region k), then dn_i/dpsi = 2 psi_i
        site_gradient = (self.cost_gradient(np.abs(psi) ** 2 @ self.region_matrix.T, target)
                         @ self.region_matrix)
        gradient = np.zeros((batch, n))
        for sample in range(batch):
            p = psi[sample]
            dcdx = np.zeros(2 * n + 1)
            dcdx[:n] = 2.0 * site_gradient[sample] * p.real
            dcdx[n:2 * n] = 2.0 * site_gradient[sample] * p.imag
            lam = np.linalg.solve(jac[sample].T, dcdx)
            dfdv = (1.0 - 1j * self.energy_relaxation) * p  # dF_i/dV_i
            gradient[sample] = -(lam[:n] * dfdv.real + lam[n:2 * n] * dfdv.imag)
        return {"V": gradient.mean(axis=0)}
