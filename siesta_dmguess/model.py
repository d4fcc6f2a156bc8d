"""The equivariant density-matrix model (torch + e3nn).

Pipeline for one batch of structures:

1. species one-hot -> scalar node features;
2. ``num_layers`` NequIP-style interactions on the message-passing graph: a
   tensor product of neighbour features with the spherical harmonics of the edge
   vector, weighted per edge by an MLP of a Bessel radial basis times a smooth
   cutoff, summed over neighbours, gated nonlinearity, residual;
3. readouts to irreps: ``node_head`` (species-dependent linear map) for on-site
   blocks, ``EdgeReadout`` (tensor products of both end atoms' features with the
   pair's spherical harmonics, weighted by an MLP of distance and both species)
   for pair blocks;
4. block assembly: each shell pair (l1, l2) of a species pair takes irreps
   l = |l1-l2|..l1+l2 of parity (-1)^(l1+l2) and contracts them with e3nn's
   Wigner 3j symbols into a (2l1+1) x (2l2+1) block; one batched matmul per
   species pair (no loop over atoms or pairs);
5. symmetrization ``D_ij(S) = D_ji(-S)^T`` (average with the transposed partner),
   e3nn -> SIESTA signs, plus SIESTA's atomic guess on the on-site diagonal.

The output is the flat SIESTA-basis array of :class:`siesta_dmguess.dm.BlockLayout`.
Species enter through embeddings and one-hot conditioning, never as one module
per species pair, so adding species only widens a few input layers. The modules
of steps 1-3 are in :mod:`siesta_dmguess.layers`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .basis import SpeciesBasis
from .conventions import to_e3nn_frame
from .e3nn_modules import o3
from .layers import (DensityEmbedding, EdgeReadout, Interaction, RadialBasis, SpeciesNorm, inference_chunks,
                     smooth_switch)


# Settings of one network's own form that a residual stage may set differently from the networks before it
# (``train --init MODEL --add-stage --config ...``): they change only the new network, never the frozen ones'
# inputs. E.g. a wider ``mp_cutoff`` gives the stage more context than the first network had.
STAGE_SETTINGS = ("mp_cutoff", "num_layers", "hidden_irreps", "pair_irreps", "lmax_sh_mp", "num_radial",
                  "radial_hidden", "product_irreps", "pair_product", "radial_basis", "species_radial",
                  "avg_num_neighbors", "pair_set")


@dataclass
class ModelConfig:
    species: list[str]
    basis: dict[str, dict]  # label -> SpeciesBasis.to_dict()
    mp_cutoff: float = 4.0  # Å, message-passing radius
    num_layers: int = 2
    # Every irrep an on-site block needs (up to 4e for d-d) must be present in the node features.
    hidden_irreps: str = "32x0e + 16x1o + 8x1e + 8x2e + 8x2o + 4x3o + 4x3e + 2x4e"
    # Both atoms' features are projected to these before the pair readout. They go up to l = 4 for the same
    # reason as lmax_sh_mp: with l <= 2 a pair along a cube axis of diamond (an atom and its own image) gets no
    # xy part, so its p_z-d_xy element, carried by the sites' octupole, is exactly zero where SIESTA has 6e-3
    # (tetrahedral_coupling.py). Models shipped before 2026-12-02 store l <= 2 in their config.
    pair_irreps: str = "16x0e + 8x1o + 4x1e + 4x2e + 4x2o + 4x3o + 4x3e + 2x4e"
    # Spherical harmonics in message passing. On a site of cubic or tetrahedral symmetry (bulk silicon) every
    # l = 1, 2 sum over neighbours vanishes, so l <= 2 leaves the on-site p-d (l = 3) and the d block's e/t2
    # splitting (l = 4) exactly zero (integration/benchmarks/tetrahedral_coupling.py); models shipped before
    # 2026-12-01 use 2 (stored in their config).
    lmax_sh_mp: int = 4
    # Å: messages fade out smoothly over this last stretch before mp_cutoff. The radial envelope alone does not
    # make them vanish there: the radial MLP sees both species and has biases, so an edge entering the cutoff
    # brings a finite message, and the prediction jumps (2.4e-3 on a silicon on-site element between two MD
    # frames 0.5 fs apart; integration/benchmarks/smoothness.py). Older configs load with 0 (LEGACY); the shipped
    # water and chno-molecules set 0.1, the shipped silicon keeps 0 (docs/studies.md).
    mp_switch: float = 0.25
    lmax_sh: int = 4  # spherical harmonics in the pair readout (d-d blocks need l = 4)
    num_radial: int = 8
    radial_hidden: int = 64
    avg_num_neighbors: float = 10.0
    # Radial weights see both atoms' species (species-pair radial functions, MACE/Allegro style).
    species_radial: bool = True
    # Irreps of the per-atom many-body product (h ⊗ h of two projections) in each layer; "" disables it.
    product_irreps: str = "8x0e + 4x1o + 4x1e + 4x2e + 4x2o"
    # The pair readout also sees the product of both atoms' projected features (i-j correlations).
    pair_product: bool = True
    radial_basis: str = "bessel"  # "bessel" or "gaussian" (narrow; resolves small bond changes)
    feature_norm: bool = False  # per-species standardization of node features (fitted on training data)
    embedding: str = "species"  # first layer: "species" (one-hot) or "density" (ACE atomic base + product)
    pattern_cutoff: float = 0.0  # Å, longest pair this network gives a block (0: SIESTA's pattern, from the basis)
    # Å: for folded (Γ-only) periodic cells, also predict blocks of image pairs up to this distance that fold onto
    # stored elements (graph.extend_for_folding). A small cell's Γ DM sums the DM over all images; SIESTA's
    # k-converged DM folded over its orbital range alone misses most of that (water8/0004: density-operator
    # error 0.52 within the pattern, 0.046 within 8 Å, 0.027 within 10 Å; benchmarks/folding_reach.py). 0: off.
    fold_reach: float = 0.0
    # Which blocks this network predicts: "pattern" (SIESTA's pattern: on-site blocks and pattern pairs), "all"
    # (those and the pairs added for folding: a model trained with fold_reach from the start), or "added" (only
    # the added pairs: a residual stage for fold_reach, which cannot change molecules or large cells), or
    # "onsite" (no pairs: a residual stage for the on-site blocks alone, which hold the largest errors of the
    # silicon crystals and are 1 in ~90 blocks there, so a stage that also fits pairs barely moves them).
    pair_set: str = "pattern"
    seed: int = 0
    # A second readout (same form as the DM's) for a Hamiltonian-like correction ΔH used by the
    # idempotent projection (see refine.py): the occupied space of -S (D/2) S + ΔH. Folding a DM that is
    # a local function of the geometry and projecting it cannot give a Γ-only DM in a small cell, which
    # comes from diagonalizing a (local) Hamiltonian at Γ; a local ΔH can carry that.
    correction_head: bool = False
    correction_scale: float = 0.02  # ΔH output scale: small, so first steps barely move a near-exact projection
    # Per species, the rotation-invariant mean on-site block of the training data (row-major,
    # SIESTA basis): the isolated-atom-like DM the on-site prediction is learned relative to.
    onsite_reference: dict = field(default_factory=dict)
    # Residual stages (multi-stage fitting): each entry {"output_scale": s, **ModelConfig overrides} is one more
    # network of this same form whose blocks, times s (the RMS of what the earlier stages left over), add to
    # theirs. Each is trained with everything before it frozen (``train --init MODEL --add-stage``): a network
    # trained by Adam stalls at a relative error of ~1e-3, and a fresh one fitted to the rescaled residual
    # takes the error down by another such factor.
    residual_stages: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def message_cutoff(self) -> float:
        """Å: the longest message-passing edge any network of the model uses (a residual stage may see farther
        than the networks before it, ``STAGE_SETTINGS``); samples are built with it and each network keeps the
        edges within its own ``mp_cutoff``."""
        return max([self.mp_cutoff] + [float(st.get("mp_cutoff", self.mp_cutoff)) for st in self.residual_stages])

    # Values of later-added fields for configs written before them (so older model folders still load).
    LEGACY = {"lmax_sh_mp": 2, "species_radial": False, "product_irreps": "", "pair_product": False,
              "radial_basis": "bessel", "feature_norm": False, "embedding": "species", "correction_head": False,
              "correction_scale": 0.1, "mp_switch": 0.0}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{**cls.LEGACY, **d})

    def species_basis(self) -> dict[str, SpeciesBasis]:
        return {k: SpeciesBasis.from_dict(v) for k, v in self.basis.items()}


# ---------------------------------------------------------------- irreps of blocks


def block_irreps(basis_a: SpeciesBasis, basis_b: SpeciesBasis):
    """(shell_a, shell_b, L, parity) for every irrep a block between two species needs."""
    out = []
    for sa, sha in enumerate(basis_a.shells):
        for sb, shb in enumerate(basis_b.shells):
            parity = (-1) ** (sha.l + shb.l)
            for L in range(abs(sha.l - shb.l), sha.l + shb.l + 1):
                out.append((sa, sb, L, parity))
    return out


def output_irreps(pairs) -> o3.Irreps:
    """Smallest irreps that can hold every species pair's block (channels shared between pairs)."""
    need: dict[tuple[int, int], int] = {}
    for basis_a, basis_b in pairs:
        count: dict[tuple[int, int], int] = {}
        for _, _, L, p in block_irreps(basis_a, basis_b):
            count[(L, p)] = count.get((L, p), 0) + 1
        for key, n in count.items():
            need[key] = max(need.get(key, 0), n)
    return o3.Irreps([(n, (L, p)) for (L, p), n in sorted(need.items())]).simplify()


def assembly_matrix(basis_a: SpeciesBasis, basis_b: SpeciesBasis, irreps: o3.Irreps) -> torch.Tensor:
    """Fixed linear map (n_a * n_b, irreps.dim): irreps vector -> flattened e3nn-basis block.

    Every (shell pair, L) takes the next free channel of irrep (L, parity); the
    Clebsch-Gordan contraction uses ``o3.wigner_3j`` (scaled by sqrt(2L+1) so
    that unit irreps give unit-size blocks).
    """
    starts, used = {}, {}
    offset = 0
    for mul, ir in irreps:
        starts[(ir.l, ir.p)] = offset
        offset += mul * ir.dim
    shell_start_a = np.cumsum([0] + [s.size for s in basis_a.shells])
    shell_start_b = np.cumsum([0] + [s.size for s in basis_b.shells])
    na, nb = basis_a.norb, basis_b.norb
    mat = torch.zeros(na, nb, irreps.dim, dtype=torch.float64)
    for sa, sb, L, p in block_irreps(basis_a, basis_b):
        la, lb = basis_a.shells[sa].l, basis_b.shells[sb].l
        c = used.get((L, p), 0)
        used[(L, p)] = c + 1
        pos = starts[(L, p)] + c * (2 * L + 1)
        w3j = o3.wigner_3j(la, lb, L, dtype=torch.float64) * math.sqrt(2 * L + 1)
        ra, rb = shell_start_a[sa], shell_start_b[sb]
        mat[ra:ra + 2 * la + 1, rb:rb + 2 * lb + 1, pos:pos + 2 * L + 1] += w3j
    return mat.reshape(na * nb, irreps.dim)


# ---------------------------------------------------------------- the model


def shrunk_gaussian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and precision matrix of features ``x`` (atoms, features), at least two atoms: the covariance is shrunk
    10 % towards its diagonal (plus 1e-6) so that it stays invertible with few atoms per feature. The novelty
    score's statistics (:meth:`DensityMatrixModel.fit_novelty`)."""
    cov = torch.cov(x.T)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    cov = 0.9 * cov + 0.1 * torch.diag(torch.diag(cov)) + 1e-6 * eye
    return x.mean(0), torch.linalg.inv(cov)


class DensityMatrixModel(nn.Module):
    """Equivariant model mapping a batch of structures to their flat SIESTA-basis DM blocks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        torch.manual_seed(config.seed)
        basis = config.species_basis()
        self.species = list(config.species)
        self.basis = [basis[s] for s in self.species]
        ns = len(self.species)
        hidden = o3.Irreps(config.hidden_irreps).sort().irreps.simplify()
        self.num_scalars = sum(m for m, ir in hidden if ir.l == 0 and ir.p == 1)
        self.irreps_sh = o3.Irreps.spherical_harmonics(config.lmax_sh)
        self.irreps_sh_mp = o3.Irreps.spherical_harmonics(config.lmax_sh_mp)
        self.embed = nn.Linear(ns, self.num_scalars, bias=False)
        self.rbf_mp = RadialBasis(config.num_radial, config.mp_cutoff, config.radial_basis)
        layers, irreps = [], o3.Irreps(f"{self.num_scalars}x0e")
        self.density = None
        if config.embedding == "density":
            self.density = DensityEmbedding(config.num_radial, self.irreps_sh_mp, ns, hidden, config.product_irreps)
            irreps = hidden
        elif config.embedding != "species":
            raise ValueError(f"unknown embedding {config.embedding!r}")
        for _ in range(config.num_layers):
            layers.append(Interaction(irreps, hidden, self.irreps_sh_mp, config.num_radial, config.radial_hidden, ns,
                                      config.avg_num_neighbors, config.species_radial, config.product_irreps))
            irreps = hidden
        self.layers = nn.ModuleList(layers)
        n_stages = len(layers) + (self.density is not None)
        self.norms = nn.ModuleList([SpeciesNorm(hidden, ns) for _ in range(n_stages)]) if config.feature_norm else None
        # Readouts: one irreps vector per atom (on-site) and per directed pattern edge.
        self.node_irreps = output_irreps([(b, b) for b in self.basis])
        self.edge_irreps = output_irreps([(a, b) for a in self.basis for b in self.basis])
        self.node_head = o3.FullyConnectedTensorProduct(hidden, o3.Irreps(f"{ns}x0e"), self.node_irreps)
        if config.pair_set not in ("pattern", "added", "all", "onsite"):
            raise ValueError(f"unknown pair_set {config.pair_set!r}")
        pattern_cutoff = config.pattern_cutoff or 2 * max(b.max_radius + b.max_kb_radius for b in self.basis)
        if config.pair_set in ("added", "all"):  # its radial functions must reach the pairs added for folding
            pattern_cutoff = max(pattern_cutoff, config.fold_reach)
        self.rbf_pattern = RadialBasis(config.num_radial, pattern_cutoff + 1e-3, config.radial_basis)
        self.edge_head = None if config.pair_set == "onsite" else \
            EdgeReadout(hidden, config.pair_irreps, self.irreps_sh, self.edge_irreps, config.num_radial,
                        config.radial_hidden, self.num_scalars, config.pair_product)
        self.correction_node_head = self.correction_edge_head = None
        if config.correction_head:
            self.correction_node_head = o3.FullyConnectedTensorProduct(hidden, o3.Irreps(f"{ns}x0e"), self.node_irreps)
            self.correction_edge_head = EdgeReadout(hidden, config.pair_irreps, self.irreps_sh, self.edge_irreps,
                                                    config.num_radial, config.radial_hidden, self.num_scalars,
                                                    config.pair_product)
            with torch.no_grad():  # starts at ΔH = 0: the plain natural-orbital projection
                self.correction_node_head.weight.zero_()
                self.correction_edge_head.linear_out.weight.zero_()
        for a in range(ns):
            self.register_buffer(f"node_assembly_{a}", assembly_matrix(self.basis[a], self.basis[a],
                                                                       self.node_irreps).to(torch.get_default_dtype()))
            for b in range(ns):
                self.register_buffer(f"edge_assembly_{a}_{b}", assembly_matrix(
                    self.basis[a], self.basis[b], self.edge_irreps).to(torch.get_default_dtype()))
        # On-site reference minus SIESTA's atomic guess (zero without a reference).
        for a, b in enumerate(self.basis):
            ref = config.onsite_reference.get(self.species[a])
            base = torch.tensor(ref, dtype=torch.float64).reshape(b.norb, b.norb) if ref else \
                torch.diag(torch.tensor(b.orbital_q0, dtype=torch.float64))
            shift = base - torch.diag(torch.tensor(b.orbital_q0, dtype=torch.float64))
            self.register_buffer(f"onsite_shift_{a}", shift.reshape(-1).to(torch.get_default_dtype()))
        # Scale of the raw outputs: DM elements are O(0.1).
        self.output_scale = 0.1
        self.edge_chunk = 4096  # pair-readout chunk at inference: bounds memory (~0.2 GB), not results
        # Residual stages: same form, no baseline of their own, last layers zero so a new stage starts as a no-op.
        self.residuals = nn.ModuleList([_residual_stage(config, k) for k in range(len(config.residual_stages))])
        # Out-of-distribution score: Mahalanobis distance of each atom's invariant features from the
        # training atoms of its species (set by ``fit_novelty`` after training; zero means "not fitted").
        self.register_buffer("novelty_mean", torch.zeros(ns, self.num_scalars))
        self.register_buffer("novelty_precision", torch.eye(self.num_scalars).repeat(ns, 1, 1))
        self.register_buffer("novelty_threshold", torch.zeros(()))

    def novelty(self, batch, features: torch.Tensor | None = None) -> torch.Tensor:
        """Per-atom novelty: mean squared Mahalanobis distance of the atom's scalar features (≈1 in distribution).
        ``features``: this network's ``node_features(batch)`` where the caller has them already.

        A residual stage keeps the statistics of the model it was added to (:func:`~siesta_dmguess.train.
        add_residual_stage`), of the same features (that model is frozen): an atom is as novel as it is to the
        data it is most familiar to, each score in units of this model's flag level. A model grown on other
        data then still knows the data it was grown from."""
        with torch.no_grad():
            x = (self.node_features(batch) if features is None else features)[:, : self.num_scalars]
            species = batch["onehot"].argmax(dim=1)
            score = self._mahalanobis(x, species)
            for stage in self.residuals:
                if float(stage.novelty_threshold) > 0 and float(self.novelty_threshold) > 0 \
                        and stage.novelty_mean.shape == self.novelty_mean.shape:
                    # a species the stage's statistics lack (fewer than two atoms of it) is novel to them
                    eye = torch.eye(self.num_scalars, dtype=x.dtype, device=x.device)
                    lacks = (stage.novelty_mean == 0).all(1) & (stage.novelty_precision == eye).all(2).all(1)
                    other = stage._mahalanobis(x, species) * (self.novelty_threshold / stage.novelty_threshold)
                    score = torch.where(lacks[species], score, torch.minimum(score, other))
            return score

    def _mahalanobis(self, x: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Novelty of features ``x`` under this module's own statistics."""
        d = x - self.novelty_mean[species]
        return torch.einsum("ni,nij,nj->n", d, self.novelty_precision[species], d) / self.num_scalars

    def fit_novelty(self, batches, quantile: float = 0.995) -> None:
        """Fit per-species mean and (shrunk) covariance of atom features on training batches."""
        feats = {a: [] for a in range(len(self.species))}
        with torch.no_grad():
            for batch in batches:
                x = self.node_features(batch)[:, : self.num_scalars]
                sp = batch["onehot"].argmax(dim=1)
                for a in feats:
                    feats[a].append(x[sp == a])
        for a, parts in feats.items():
            x = torch.cat(parts) if parts else torch.zeros(0, self.num_scalars)
            if x.shape[0] < 2:
                continue
            self.novelty_mean[a], self.novelty_precision[a] = shrunk_gaussian(x)
        with torch.no_grad():
            scores = torch.cat([self._mahalanobis(self.node_features(b)[:, : self.num_scalars],
                                                  b["onehot"].argmax(dim=1)) for b in batches])
        self.novelty_threshold.fill_(float(torch.quantile(scores, quantile)) if scores.numel() else 0.0)

    def node_features(self, batch, raw_stage: int | None = None) -> torch.Tensor:
        """Per-atom irreps features after the embedding and every interaction (each standardized).

        ``raw_stage=k`` returns the features of stage k before its standardization (for fitting it).
        """
        onehot = batch["onehot"]
        species = onehot.argmax(dim=1)
        src, dst, vec = batch["mp_src"], batch["mp_dst"], batch["mp_vec"]
        length = vec.norm(dim=1)  # the e3nn frame only permutes axes: same lengths
        # Samples carry edges up to the model's longest cutoff (ModelConfig.message_cutoff); keep this network's.
        within = length < self.config.mp_cutoff
        if not bool(within.all()):
            src, dst, vec, length = src[within], dst[within], vec[within], length[within]
        vec = to_e3nn_frame(vec)
        sh = o3.spherical_harmonics(self.irreps_sh_mp, vec, normalize=True, normalization="component")
        if self.config.mp_switch > 0:  # every message is linear in its edge's harmonics: this fades it out
            sh = sh * smooth_switch(length, self.config.mp_cutoff, self.config.mp_switch)[:, None]
        rbf = self.rbf_mp(length)
        stages = list(self.layers)
        if self.density is not None:
            h = None
            stages.insert(0, lambda _h, *args: self.density(*args, self.layers[0].norm if len(self.layers) else 1.0))
        else:
            h = self.embed(onehot)
        for k, stage in enumerate(stages):
            h = stage(h, onehot, src, dst, sh, rbf)
            if k == raw_stage:
                return h
            if self.norms is not None:
                h = self.norms[k](h, species)
        return h

    @torch.no_grad()
    def fit_feature_norms(self, batches) -> None:
        """Data-dependent initialization: fit every stage's :class:`SpeciesNorm` on training batches, in order."""
        if self.norms is None:
            return
        for k, norm in enumerate(self.norms):
            feats = [self.node_features(batch, raw_stage=k) for batch in batches]
            species = [batch["onehot"].argmax(dim=1) for batch in batches]
            norm.fit(torch.cat(feats), torch.cat(species))

    def forward(self, batch) -> torch.Tensor:
        """Flat SIESTA-basis DM values (``batch['n_flat']``,) for the batch's block layout."""
        return self.density_from_features(self.node_features(batch), batch)

    def density_from_features(self, h, batch) -> torch.Tensor:
        """The DM from this network's node features ``h``, plus every residual stage's blocks (their own features)."""
        flat = self.stage_blocks(h, batch) + batch["atomic"]
        for (a, _, flat_idx) in batch["node_groups"]:
            shift = getattr(self, f"onsite_shift_{a}")
            flat = flat.index_add(0, flat_idx.reshape(-1), shift.expand(flat_idx.shape[0], -1).reshape(-1))
        for stage in self.residuals:
            flat = flat + stage.stage_blocks(stage.node_features(batch), batch)
        return flat

    def stage_blocks(self, h, batch) -> torch.Tensor:
        """This network's own scaled blocks (no baseline, no residual stages): what a residual stage adds."""
        return self._blocks(h, batch, self.node_head, self.edge_head) * self.output_scale

    def correction_from_features(self, h, batch) -> torch.Tensor:
        """Flat SIESTA-basis ΔH (same layout as the DM; dimensionless, like occupations) or zeros."""
        if self.correction_node_head is None:
            return torch.zeros(batch["n_flat"], dtype=h.dtype, device=h.device)
        return self._blocks(h, batch, self.correction_node_head, self.correction_edge_head) * \
            self.config.correction_scale

    def _blocks(self, h, batch, node_head, edge_head) -> torch.Tensor:
        """Symmetric SIESTA-basis blocks from the node and edge readouts (steps 3-5 of the module docstring)."""
        flat = torch.zeros(batch["n_flat"], dtype=h.dtype, device=h.device)
        added_only = self.config.pair_set == "added"
        if not added_only:
            node_out = node_head(h, batch["onehot"])
            for (a, idx_atoms, flat_idx) in batch["node_groups"]:
                mat = getattr(self, f"node_assembly_{a}")
                flat[flat_idx.reshape(-1)] = (node_out[idx_atoms] @ mat.T).reshape(-1)
        if edge_head is not None:  # pair_set "onsite" has none: its pair blocks stay zero
            self._add_edge_blocks(flat, h, batch, edge_head, added_only)
        return 0.5 * (flat + flat[batch["transpose"]]) * batch["signs"]

    def _add_edge_blocks(self, flat, h, batch, edge_head, added_only: bool) -> None:
        """Write the edge readout's pair blocks into ``flat`` (in place), for the pairs this network predicts."""
        src, dst, vec = batch["pat_src"], batch["pat_dst"], to_e3nn_frame(batch["pat_vec"])
        n_edges = src.numel()
        # Pairs this network does not predict (pair_set; added for folding, see ModelConfig.fold_reach) keep zero
        # blocks. Without added pairs (every shipped model, molecules, large cells) no edge is left out.
        within = None
        if added_only:
            within = torch.nonzero(batch["pat_added"]).squeeze(1)
        elif self.config.pair_set == "pattern" and bool(batch["pat_added"].any()):
            within = torch.nonzero(~batch["pat_added"]).squeeze(1)
        if within is not None:
            src, dst, vec = src[within], dst[within], vec[within]
        if src.numel():
            sh = o3.spherical_harmonics(self.irreps_sh, vec, normalize=True, normalization="component")
            rbf = self.rbf_pattern(vec.norm(dim=1))
            edge_out = torch.cat([edge_head(h, src[part], dst[part], sh[part], rbf[part])
                                  for part in inference_chunks(src.numel(), self.edge_chunk)])
            if within is not None:
                edge_out = edge_out.new_zeros(n_edges, edge_out.shape[1]).index_copy(0, within, edge_out)
            for (a, b, idx_edges, flat_idx) in batch["edge_groups"]:
                mat = getattr(self, f"edge_assembly_{a}_{b}")
                flat[flat_idx.reshape(-1)] = (edge_out[idx_edges] @ mat.T).reshape(-1)


def _residual_stage(config: ModelConfig, k: int) -> DensityMatrixModel:
    """Residual stage ``k`` of ``config``: the same network form (with the stage's overrides), its own seed, no
    baseline, ΔH head or stages of its own. Its last layers start at a tenth of their usual size: a new stage
    first adds ~0.5 % to the error it is to learn, and unlike zero layers every layer gets a gradient at once."""
    overrides = {key: v for key, v in config.residual_stages[k].items() if key != "output_scale"}
    stage_config = ModelConfig.from_dict({**config.to_dict(), **overrides, "seed": config.seed + 1 + k,
                                          "correction_head": False, "onsite_reference": {}, "residual_stages": []})
    stage = DensityMatrixModel(stage_config)
    stage.output_scale = float(config.residual_stages[k]["output_scale"])
    with torch.no_grad():
        stage.node_head.weight.mul_(0.1)
        if stage.edge_head is not None:
            stage.edge_head.linear_out.weight.mul_(0.1)
    return stage


# ---------------------------------------------------------------- batching


def collate(samples, num_species: int, dtype=torch.float32, with_targets: bool = True) -> dict:
    """Concatenate samples into one disconnected graph with one flat block array.

    Block groups (one per species, one per ordered species pair) are index
    arrays into the flat array, so the model needs one matmul per group.
    """
    atom_off = flat_off = target_off = 0
    parts: dict[str, list] = {k: [] for k in ("species", "mp_src", "mp_dst", "mp_vec", "pat_src", "pat_dst",
                                                "pat_vec", "pat_added", "transpose", "signs", "atomic", "block_i", "block_j",
                                                "block_start", "target_index", "target_values", "sample_of_flat")}
    for k, s in enumerate(samples):
        lay = s.layout
        parts["species"].append(s.species)
        parts["mp_src"].append(s.mp_edges.src + atom_off)
        parts["mp_dst"].append(s.mp_edges.dst + atom_off)
        parts["mp_vec"].append(s.mp_edges.vectors)
        parts["pat_src"].append(s.pattern.src + atom_off)
        parts["pat_dst"].append(s.pattern.dst + atom_off)
        parts["pat_vec"].append(s.pattern.vectors)
        parts["pat_added"].append(s.pattern.added if s.pattern.added is not None else np.zeros(len(s.pattern), bool))
        parts["transpose"].append(lay.transpose + flat_off)
        parts["signs"].append(lay.signs)
        parts["atomic"].append(lay.atomic)
        parts["block_i"].append(lay.block_i + atom_off)
        parts["block_j"].append(lay.block_j + atom_off)
        parts["block_start"].append(lay.block_offset[:-1] + flat_off)
        parts["sample_of_flat"].append(np.full(lay.size, k))
        if with_targets and s.target_index is not None:
            parts["target_index"].append(np.where(s.target_index >= 0, s.target_index + target_off, -1))
            parts["target_values"].append(s.target_values)
            target_off += s.target_values.size
        atom_off += s.species.size
        flat_off += lay.size
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    species = cat["species"].astype(np.int64)
    nat = species.size
    # On-site blocks are the first n_atoms blocks of every sample.
    is_onsite = np.concatenate([np.arange(s.layout.block_i.size) < s.species.size for s in samples])
    node_groups, edge_groups = [], []
    si, sj = species[cat["block_i"].astype(np.int64)], species[cat["block_j"].astype(np.int64)]
    start = cat["block_start"].astype(np.int64)
    for a in range(num_species):
        sel = np.nonzero(is_onsite & (si == a))[0]
        if sel.size:
            atoms_idx = cat["block_i"][sel].astype(np.int64)
            n = int(round(math.sqrt(_block_size(samples, a))))
            flat_idx = start[sel][:, None] + np.arange(n * n)[None, :]
            node_groups.append((a, torch.as_tensor(atoms_idx), torch.as_tensor(flat_idx)))
        for b in range(num_species):
            sel = np.nonzero(~is_onsite & (si == a) & (sj == b))[0]
            if sel.size:
                size = _pair_size(samples, a, b)
                flat_idx = start[sel][:, None] + np.arange(size)[None, :]
                edge_groups.append((a, b, torch.as_tensor(sel - _onsite_before(is_onsite, sel)),
                                    torch.as_tensor(flat_idx)))
    t = lambda x, dt=dtype: torch.as_tensor(np.asarray(x), dtype=dt)  # noqa: E731
    batch = {
        "onehot": torch.nn.functional.one_hot(torch.as_tensor(species), num_species).to(dtype),
        "mp_src": t(cat["mp_src"], torch.long), "mp_dst": t(cat["mp_dst"], torch.long),
        "mp_vec": t(cat["mp_vec"].reshape(-1, 3)),
        "pat_src": t(cat["pat_src"], torch.long), "pat_dst": t(cat["pat_dst"], torch.long),
        "pat_vec": t(cat["pat_vec"].reshape(-1, 3)), "pat_added": t(cat["pat_added"], torch.bool),
        "transpose": t(cat["transpose"], torch.long), "signs": t(cat["signs"]), "atomic": t(cat["atomic"]),
        "n_flat": int(cat["signs"].size), "n_atoms": nat,
        "node_groups": node_groups, "edge_groups": edge_groups,
        "sample_of_flat": t(cat["sample_of_flat"], torch.long),
    }
    if with_targets and parts["target_index"]:
        batch["target_index"] = t(cat["target_index"], torch.long)
        batch["target_values"] = t(cat["target_values"])
        sample_of_target = np.concatenate([np.full(s.target_values.size, k) for k, s in enumerate(samples)])
        batch["sample_of_target"] = t(sample_of_target, torch.long)
    return batch


def _onsite_before(is_onsite: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """Number of on-site blocks before each selected block (turns block ids into edge ids)."""
    return np.cumsum(is_onsite)[sel]


def _block_size(samples, a: int) -> int:
    for s in samples:
        hit = np.nonzero(s.species == a)[0]
        if hit.size:
            i = hit[0]
            return int(s.layout.block_offset[i + 1] - s.layout.block_offset[i])
    raise KeyError(a)


def _pair_size(samples, a: int, b: int) -> int:
    for s in samples:
        nat = s.species.size
        e = np.nonzero((s.species[s.pattern.src] == a) & (s.species[s.pattern.dst] == b))[0]
        if e.size:
            k = nat + e[0]
            return int(s.layout.block_offset[k + 1] - s.layout.block_offset[k])
    raise KeyError((a, b))


def onsite_reference(samples, species: list[str], basis: dict[str, SpeciesBasis]) -> dict[str, list[float]]:
    """Rotation-invariant mean on-site block per species from samples with targets.

    Only blocks between two shells of equal l have an invariant part, a multiple of
    the identity: its coefficient is the mean of trace/(2l+1) over all atoms. The
    result is symmetric and unchanged by SIESTA's (-1)^m signs.
    """
    sums = {s: np.zeros((basis[s].norb, basis[s].norb)) for s in species}
    counts = {s: 0 for s in species}
    for smp in samples:
        lay = smp.layout
        for i, a in enumerate(smp.species):
            label = species[a]
            lo, hi = lay.block_offset[i], lay.block_offset[i + 1]
            idx = smp.target_index[lo:hi]
            vals = np.where(idx >= 0, smp.target_values[np.maximum(idx, 0)], 0.0)
            sums[label] += vals.reshape(basis[label].norb, -1)
            counts[label] += 1
    out = {}
    for label in species:
        if not counts[label]:
            continue
        mean = sums[label] / counts[label]
        b = basis[label]
        starts = np.cumsum([0] + [s.size for s in b.shells])
        ref = np.zeros_like(mean)
        for x, sx in enumerate(b.shells):
            for y, sy in enumerate(b.shells):
                if sx.l == sy.l:
                    blk = mean[starts[x]:starts[x + 1], starts[y]:starts[y + 1]]
                    # The rotation-invariant part: the trace, the same in SIESTA's basis as in e3nn's (the two
                    # differ by an orthogonal change of basis, conventions.convert_blocks).
                    c = np.trace(blk) / sx.size
                    ref[starts[x]:starts[x + 1], starts[y]:starts[y + 1]] = c * np.eye(sx.size)
        out[label] = ref.reshape(-1).tolist()
    return out


def fold_to_targets(pred_flat: torch.Tensor, batch: dict) -> torch.Tensor:
    """Sum flat predictions onto the reference's stored elements (folds images for Γ-only references)."""
    idx = batch["target_index"]
    valid = idx >= 0
    out = torch.zeros_like(batch["target_values"])
    return out.index_add_(0, idx[valid], pred_flat[valid])
