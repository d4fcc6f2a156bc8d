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
per species pair, so adding species only widens a few input layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from e3nn import nn as e3nn_nn
from e3nn import o3
from torch import nn

from .basis import SpeciesBasis
from .conventions import to_e3nn_frame


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


# ---------------------------------------------------------------- building blocks


class RadialBasis(nn.Module):
    """Radial features times a smooth polynomial cutoff (p = 6).

    ``kind="bessel"``: sin(n pi r / rc) / r (NequIP). ``kind="gaussian"``: Gaussians
    of width equal to their spacing on [0, rc]. Gaussians resolve small changes of
    a bond length (a DM element moves by ~1e-2 per 0.01 Å) much better than the
    long-wavelength Bessel functions, which the network then has to amplify.
    """

    def __init__(self, num: int, cutoff: float, kind: str = "bessel"):
        super().__init__()
        self.cutoff = float(cutoff)
        self.kind = kind
        if kind == "bessel":
            self.register_buffer("freq", torch.arange(1, num + 1, dtype=torch.get_default_dtype()) * math.pi)
        elif kind == "gaussian":
            self.register_buffer("centers", torch.linspace(0.0, self.cutoff, num, dtype=torch.get_default_dtype()))
            self.width = self.cutoff / (num - 1)
        else:
            raise ValueError(f"unknown radial basis {kind!r}")

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        x = (r / self.cutoff).clamp(min=1e-9, max=1.0)
        if self.kind == "bessel":
            features = math.sqrt(2.0 / self.cutoff) * torch.sin(self.freq * x[:, None]) / (x[:, None] * self.cutoff)
        else:
            features = torch.exp(-0.5 * ((r[:, None] - self.centers) / self.width) ** 2)
        p = 6.0
        envelope = 1 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
        return features * (envelope * (r < self.cutoff))[:, None]


def smooth_switch(r: torch.Tensor, cutoff: float, width: float) -> torch.Tensor:
    """1 below ``cutoff - width``, 0 from ``cutoff`` on, and a C2 smoothstep between (value, slope and curvature
    continuous), so that a quantity multiplied by it changes continuously as an edge crosses the cutoff."""
    x = ((r - (cutoff - width)) / width).clamp(0.0, 1.0)
    return 1.0 - x**3 * (10.0 - 15.0 * x + 6.0 * x**2)


def mlp(sizes: list[int]) -> nn.Sequential:
    layers = []
    for k in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[k], sizes[k + 1]))
        if k < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class ChannelwiseTensorProduct(nn.Module):
    """Channel-wise ('uvu') tensor product x ⊗ Y -> every wanted irrep, with one weight per edge and channel.

    Same algebra as ``e3nn.o3.TensorProduct`` with 'uvu' instructions and
    per-edge weights (Clebsch-Gordan coefficients from ``o3.wigner_3j``; equal to
    e3nn's with component normalization, ``tests/test_model_equivariance.py``), written
    as one split plus one batched matmul per (input irrep, harmonic) pair: e3nn's
    generic kernel slices its inputs once per path, and on CPU the backward pass of
    those slices (a zero-filled copy each) dominated training time on 10^4-edge batches.
    """

    def __init__(self, irreps_in, irreps_sh, wanted):
        super().__init__()
        self.irreps_in, self.irreps_sh = o3.Irreps(irreps_in), o3.Irreps(irreps_sh)
        wanted_set = {ir for _, ir in o3.Irreps(wanted)}
        self.paths, out = [], []
        for i, (mul, ir_in) in enumerate(self.irreps_in):
            for j, (_, ir_sh) in enumerate(self.irreps_sh):
                for ir_out in ir_in * ir_sh:
                    if ir_out in wanted_set:
                        k = len(self.paths)
                        cg = o3.wigner_3j(ir_in.l, ir_sh.l, ir_out.l, dtype=torch.float64) * math.sqrt(ir_out.dim)
                        self.register_buffer(f"cg_{k}", cg.to(torch.get_default_dtype()))
                        self.paths.append((i, j, mul))
                        out.append((mul, ir_out))
        self.irreps_out = o3.Irreps(out)
        self.weight_numel = sum(mul for _, _, mul in self.paths)
        # Paths of one (input irrep, harmonic) pair differ only in their output irrep: one matmul serves them
        # all, against their Clebsch-Gordan coefficients side by side (not saved: made from cg_k).
        self.groups = []
        for k, (i, j, _) in enumerate(self.paths):
            if self.groups and self.groups[-1][:2] == (i, j):
                self.groups[-1][2].append(k)
            else:
                self.groups.append((i, j, [k]))
        for g, (_, _, ks) in enumerate(self.groups):
            self.register_buffer(f"cg_group_{g}", torch.cat([getattr(self, f"cg_{k}") for k in ks], dim=2),
                                 persistent=False)

    def forward(self, x: torch.Tensor, sh: torch.Tensor, weight: torch.Tensor,
                linear: o3.Linear | None = None) -> torch.Tensor:
        """The product (E, irreps_out.dim); with ``linear`` (an e3nn Linear on ``irreps_out``, no biases),
        ``linear`` applied to it, without forming the product's wide output: each output irrep of ``linear`` is
        one contraction of the paths that produce that irrep with their block of its weights. Same result as
        ``forward(x, sh, weight) @ dense_matrix(linear)``, which spends most of its time on zero blocks."""
        n = x.shape[0]
        xs = [t.reshape(n, mul, ir.dim) for t, (mul, ir) in zip(x.split([m * ir.dim for m, ir in self.irreps_in], 1),
                                                                  self.irreps_in)]
        shs = sh.split([ir.dim for _, ir in self.irreps_sh], 1)
        ws = weight.split([mul for _, _, mul in self.paths], 1)
        if linear is not None:
            return self._fused(n, xs, shs, ws, linear)
        outs, ys = [], {}
        for g, (i, j, ks) in enumerate(self.groups):
            key = self._coupling_key(g)
            if key not in ys:
                ys[key] = torch.einsum("ej,ijk->eik", shs[j], getattr(self, f"cg_group_{g}"))  # (E, 2l_in+1, Σ)
            z = torch.bmm(xs[i], ys[key])  # (E, mul, Σ_k 2l_out+1)
            for k, part in zip(ks, z.split([self.irreps_out[k].ir.dim for k in ks], dim=2)):
                outs.append(part * ws[k][:, :, None])  # (E, mul, 2l_out+1)
        return torch.cat([z.reshape(n, z.shape[1] * z.shape[2]) for z in outs], dim=1)  # n may be 0

    def _coupling_key(self, g: int) -> tuple:
        """The coupling of group ``g`` depends only on the l's: input irreps of another parity share it if they
        make the same l's."""
        i, j, ks = self.groups[g]
        return self.irreps_in[i].ir.l, j, tuple(self.irreps_out[k].ir.l for k in ks)

    def _fused(self, n: int, xs, shs, ws, linear: o3.Linear) -> torch.Tensor:
        """The product followed by ``linear``, computed with the components before the channels, (E, 2l+1, mul):
        the contraction of each path's channels with its rows of the Linear's weights is then a plain matmul (in
        e3nn's layout, (E, mul, 2l+1), einsum copied and permuted every path's product; 12-26 % slower on
        water boxes of 24-192 atoms)."""
        parts, ys = [None] * len(self.paths), {}
        for g, (i, j, ks) in enumerate(self.groups):
            key = self._coupling_key(g)
            if key not in ys:
                ys[key] = torch.einsum("ej,ijk->eki", shs[j], getattr(self, f"cg_group_{g}"))  # (E, Σ, 2l_in+1)
            z = torch.bmm(ys[key], xs[i].transpose(1, 2))  # (E, Σ_k 2l_out+1, mul)
            for k, part in zip(ks, z.split([self.irreps_out[k].ir.dim for k in ks], dim=1)):
                parts[k] = part  # (E, 2l_out+1, mul)
        matrix = dense_matrix(linear)
        result = []
        for (mul_out, ir), (paths, rows, cols) in zip(linear.irreps_out, self._linear_blocks(linear)):
            if not paths:  # an output irrep no path produces: the Linear leaves it zero
                result.append(shs[0].new_zeros(n, mul_out * ir.dim))
                continue
            block = matrix[rows[:, None], cols[None, :]]  # (Σ mul of the paths, mul of this output irrep)
            total, start = None, 0
            for k in paths:  # Σ_k (path k times its edge weights) @ (its rows of the block)
                mul = self.paths[k][2]
                term = torch.matmul(parts[k] * ws[k][:, None, :], block[start:start + mul])
                total = term if total is None else total + term
                start += mul
            result.append(total.transpose(1, 2).reshape(n, mul_out * ir.dim))  # e3nn's order (E, mul, 2l+1)
        return torch.cat(result, dim=1)

    def _linear_blocks(self, linear: o3.Linear) -> list:
        """Per output irrep of ``linear``: the paths that produce it and the rows / columns of ``dense_matrix(linear)``
        that connect them (channel u of a path to channel v of the output, at component m = 0; the Linear is the
        identity on components). Cached: it depends only on the irreps."""
        cached = getattr(self, "_linear_index", None)
        if cached is not None and cached[0] is linear:
            return cached[1]
        if linear.irreps_in != self.irreps_out:
            raise ValueError("the Linear's input must be this product's output")
        offsets, offset = [], 0
        for mul, ir in self.irreps_out:
            offsets.append(offset)
            offset += mul * ir.dim
        blocks, col = [], 0
        for mul_out, ir in linear.irreps_out:
            paths = [k for k, (_, ir_k) in enumerate(self.irreps_out) if ir_k == ir]
            rows = torch.cat([offsets[k] + ir.dim * torch.arange(self.irreps_out[k].mul) for k in paths]) \
                if paths else torch.zeros(0, dtype=torch.long)
            cols = col + ir.dim * torch.arange(mul_out)
            blocks.append((paths, rows, cols))
            col += mul_out * ir.dim
        self._linear_index = (linear, blocks)
        return blocks


def inference_chunks(n_edges: int, chunk: int) -> list[slice]:
    """Slices of at most ``chunk`` edges at inference, which bound the per-edge intermediates' memory on large
    systems; one slice of all edges while gradients are recorded (training keeps its graph in one piece)."""
    if torch.is_grad_enabled() or n_edges <= chunk:
        return [slice(0, n_edges)]
    return [slice(k, k + chunk) for k in range(0, n_edges, chunk)]


def gate_for(irreps_out: o3.Irreps) -> e3nn_nn.Gate:
    """Gated nonlinearity producing ``irreps_out``: SiLU on scalars, sigmoid gates on the rest."""
    scalars = o3.Irreps([(m, ir) for m, ir in irreps_out if ir.l == 0])
    gated = o3.Irreps([(m, ir) for m, ir in irreps_out if ir.l > 0])
    gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")
    return e3nn_nn.Gate(scalars, [torch.nn.functional.silu] * len(scalars), gates,
                        [torch.sigmoid] * len(gates), gated)


class Interaction(nn.Module):
    """One message-passing layer.

    m_i = sum_j TP(h_j, Y(r_ij); R(|r_ij|, Z_i, Z_j)); optionally a many-body term
    P(m_i) = FCTP(A m_i, B m_i) (a body-order raising product of the aggregated
    messages, as in MACE's symmetric contraction but of order 2); then
    h_i <- gate(m_i + P(m_i) + self(h_i, species)) with a residual when shapes agree.
    """

    def __init__(self, irreps_in, irreps_out, irreps_sh, num_radial, radial_hidden, num_species, avg_neighbors,
                 species_radial=True, product_irreps=""):
        super().__init__()
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        self.gate = gate_for(self.irreps_out)
        self.linear_in = o3.Linear(self.irreps_in, self.irreps_in)
        self.tp = ChannelwiseTensorProduct(self.irreps_in, irreps_sh, self.gate.irreps_in)
        mid = self.tp.irreps_out
        self.species_radial = species_radial
        n_in = num_radial + (2 * num_species if species_radial else 0)
        self.radial = mlp([n_in, radial_hidden, self.tp.weight_numel])
        # Only ever applied through dense_matrix (fused into the product): skip e3nn's einsum-path search.
        self.linear_out = o3.Linear(mid, self.gate.irreps_in, _optimize_einsums=False)
        self.product = None
        if product_irreps:
            prod = o3.Irreps(product_irreps).sort().irreps.simplify()
            self.product_a = o3.Linear(self.gate.irreps_in, prod)
            self.product_b = o3.Linear(self.gate.irreps_in, prod)
            self.product = o3.FullyConnectedTensorProduct(prod, prod, self.gate.irreps_in)
        self.self_connection = o3.FullyConnectedTensorProduct(self.irreps_in, o3.Irreps(f"{num_species}x0e"),
                                                              self.gate.irreps_in)
        self.norm = 1.0 / math.sqrt(avg_neighbors)
        self.edge_chunk = 8192  # messages per step at inference (see forward)

    def forward(self, h, onehot, src, dst, sh, rbf):
        x = self.linear_in(h)
        radial_in = torch.cat([rbf, onehot[src], onehot[dst]], dim=1) if self.species_radial else rbf
        # The Linear is applied per message (fused into the product, narrower) before the sum: the two commute.
        m = torch.zeros(h.shape[0], self.gate.irreps_in.dim, dtype=x.dtype, device=x.device)
        # Summed chunk by chunk at inference: fresh multi-GB message tensors made a 10^4-atom prediction superlinear.
        for part in inference_chunks(src.numel(), self.edge_chunk):
            msg = self.tp(x[src[part]], sh[part], self.radial(radial_in[part]), linear=self.linear_out)
            m.index_add_(0, dst[part], msg)
        m = m * self.norm
        if self.product is not None:
            m = m + self.product(self.product_a(m), self.product_b(m))
        out = self.gate(m + self.self_connection(h, onehot))
        return out + h if self.irreps_in == self.irreps_out else out


class EdgeReadout(nn.Module):
    """Pair irreps from both end atoms' features and the pair's geometry, conditioned on both species.

    Both atoms' features are first projected to a small ``irreps_pair`` (cheap, per
    atom), concatenated (optionally with their channel-wise product, which carries
    i-j correlations such as the relative orientation of the two environments),
    and multiplied channel-wise with the pair's spherical harmonics; the per-edge
    weights come from an MLP of the radial basis and both atoms' scalar features,
    so every species pair gets its own radial functions.
    """

    def __init__(self, irreps_node, irreps_pair, irreps_sh, irreps_out, num_radial, radial_hidden, num_scalars,
                 pair_product=False):
        super().__init__()
        self.irreps_out = o3.Irreps(irreps_out)
        irreps_pair = o3.Irreps(irreps_pair).sort().irreps.simplify()  # e3nn's canonical order
        self.project = o3.Linear(irreps_node, irreps_pair)
        self.pair_product = None
        parts = [irreps_pair, irreps_pair]
        if pair_product:
            self.pair_product = o3.ElementwiseTensorProduct(irreps_pair, irreps_pair)
            parts.append(self.pair_product.irreps_out)
        cat = o3.Irreps([(mul, ir) for p in parts for mul, ir in p])
        sorted_cat = cat.sort()
        self.register_buffer("order", _sorted_columns(cat, sorted_cat.inv), persistent=False)
        both = sorted_cat.irreps.simplify()
        self.tp = ChannelwiseTensorProduct(both, irreps_sh, self.irreps_out)
        mid = self.tp.irreps_out
        self.weights = mlp([num_radial + 2 * num_scalars, radial_hidden, radial_hidden, self.tp.weight_numel])
        self.linear_out = o3.Linear(mid, self.irreps_out, _optimize_einsums=False)  # as in Interaction
        self.num_scalars = num_scalars

    def forward(self, h, src, dst, sh, rbf):
        s = self.num_scalars
        w = self.weights(torch.cat([rbf, h[src, :s], h[dst, :s]], dim=1))
        p = self.project(h)
        parts = [p[src], p[dst]]
        if self.pair_product is not None:
            parts.append(self.pair_product(p[src], p[dst]))
        # Concatenated irreps, reordered into the sorted layout the product expects.
        x = torch.cat(parts, dim=1)[:, self.order]
        return self.tp(x, sh, w, linear=self.linear_out)


def _sorted_columns(irreps: o3.Irreps, inv) -> torch.Tensor:
    """Column order that lays out the blocks of ``irreps`` in the order of ``irreps.sort()``."""
    slices = irreps.slices()
    order = []
    for k in inv:  # inv[new position] = old index
        order.extend(range(slices[k].start, slices[k].stop))
    return torch.tensor(order, dtype=torch.long)


def dense_matrix(linear: o3.Linear) -> torch.Tensor:
    """The (dim_in, dim_out) matrix of an e3nn Linear (no biases), differentiable in its weights.

    Applying it as one matmul gives the same equivariant map as ``linear(x)``; on
    edge-sized inputs it avoids e3nn's per-irrep slicing, whose backward pass
    zero-fills an input-sized tensor per slice. :class:`ChannelwiseTensorProduct`
    takes its non-zero blocks when a Linear is fused into it. Built block by block from the
    Linear's instructions (weight block (mul_in, mul_out) times the identity on
    the 2l+1 components, scaled by e3nn's path weight), never as ``linear(eye)``,
    whose cost grows with dim_in squared.
    """
    if linear.bias.numel():
        raise ValueError("dense_matrix supports e3nn Linear layers without biases")
    if not torch.is_grad_enabled():  # inference: reuse the matrix while the weights are unchanged
        key = (linear.weight._version, linear.weight.dtype, linear.weight.data_ptr())
        cached = getattr(linear, "_dense_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
    index = getattr(linear, "_dense_index", None)
    if index is None:
        index = linear._dense_index = _dense_index(linear)
    position, weight_index, scale = index
    values = linear.weight[weight_index] * scale.to(linear.weight.dtype)
    matrix = linear.weight.new_zeros(linear.irreps_in.dim * linear.irreps_out.dim).index_put((position,), values)
    matrix = matrix.reshape(linear.irreps_in.dim, linear.irreps_out.dim)
    if not torch.is_grad_enabled():
        linear._dense_cache = (key, matrix)
    return matrix


class SpeciesNorm(nn.Module):
    """Per-species standardization of equivariant features, fitted once on training data and then frozen.

    Scalars are shifted by their per-species mean and scaled to unit variance;
    every other irrep channel is scaled to unit mean squared norm (no shift, so
    equivariance is kept). Distorted copies of one molecule differ by ~1e-3 in
    raw features; standardized, the heads need O(1) weights instead of weights
    that Adam (steps of ~lr per update) would take 1e5 steps to grow.
    """

    def __init__(self, irreps, num_species: int):
        super().__init__()
        self.irreps = o3.Irreps(irreps)
        dim = self.irreps.dim
        self.register_buffer("shift", torch.zeros(num_species, dim))
        self.register_buffer("scale", torch.ones(num_species, dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def forward(self, h, species):
        return (h - self.shift[species]) * self.scale[species]

    @torch.no_grad()
    def fit(self, h, species, floor: float = 1e-4) -> None:
        """Set shift and scale from features ``h`` (N, dim) of atoms with species index ``species`` (N,)."""
        for a in range(self.shift.shape[0]):
            x = h[species == a]
            if x.shape[0] < 2:
                continue
            shift, scale = torch.zeros_like(x[0]), torch.ones_like(x[0])
            for sl, (mul, ir) in zip(self.irreps.slices(), self.irreps):
                block = x[:, sl].reshape(x.shape[0], mul, ir.dim)
                if ir.l == 0 and ir.p == 1:
                    mean = block.mean(dim=0)
                    std = block.std(dim=0)
                    shift[sl] = mean.reshape(-1)
                else:
                    mean = torch.zeros_like(block[0])
                    std = block.pow(2).mean(dim=(0, 2)).sqrt()[:, None].expand(mul, ir.dim)
                scale[sl] = (1.0 / std.clamp(min=floor)).reshape(-1)
            self.shift[a], self.scale[a] = shift, scale
        self.fitted.fill_(True)


class DensityEmbedding(nn.Module):
    """First layer: ACE's atomic base A_i = sum_j G_n(|r_ij|) Y_lm(r_ij) with one channel per radial function
    and neighbour species, mapped linearly (per centre species) plus an order-2 product (bond angles) to
    the hidden irreps.

    Unlike a learned radial MLP at random initialization, the raw narrow Gaussians
    make the first features respond at O(1) to the small bond and angle changes
    that move the DM, so training does not have to amplify near-constant inputs.
    """

    def __init__(self, num_radial, irreps_sh, num_species, irreps_out, product_irreps=""):
        super().__init__()
        self.mul = num_radial * num_species
        self.irreps_sh = o3.Irreps(irreps_sh)
        self.irreps_a = o3.Irreps([(self.mul, ir) for _, ir in self.irreps_sh])
        self.irreps_out = o3.Irreps(irreps_out)
        onehot = o3.Irreps(f"{num_species}x0e")
        self.linear = o3.FullyConnectedTensorProduct(self.irreps_a, onehot, self.irreps_out)
        self.product = None
        if product_irreps:
            prod = o3.Irreps(product_irreps).sort().irreps.simplify()
            self.product_a = o3.Linear(self.irreps_a, prod)
            self.product_b = o3.Linear(self.irreps_a, prod)
            self.product = o3.FullyConnectedTensorProduct(prod, prod, self.irreps_out)

    def forward(self, onehot, src, dst, sh, rbf, avg_norm: float):
        n = onehot.shape[0]
        w = (rbf[:, :, None] * onehot[src][:, None, :]).reshape(rbf.shape[0], self.mul)
        parts = [(w[:, :, None] * y[:, None, :]).reshape(w.shape[0], -1)
                 for y in sh.split([ir.dim for _, ir in self.irreps_sh], dim=1)]
        a = torch.zeros(n, self.irreps_a.dim, dtype=w.dtype, device=w.device).index_add_(0, dst, torch.cat(parts, 1))
        a = a * avg_norm
        h = self.linear(a, onehot)
        if self.product is not None:
            h = h + self.product(self.product_a(a), self.product_b(a))
        return h


def _dense_index(linear: o3.Linear):
    """(flat matrix position, weight index, path weight) of every non-zero of an e3nn Linear's matrix."""
    rows, cols = linear.irreps_in.slices(), linear.irreps_out.slices()
    position, weight_index, scale = [], [], []
    offset = 0
    for ins in linear.instructions:
        mul_in, mul_out = ins.path_shape
        d = linear.irreps_in[ins.i_in].ir.dim
        u, v, m = np.meshgrid(np.arange(mul_in), np.arange(mul_out), np.arange(d), indexing="ij")
        row = rows[ins.i_in].start + u * d + m
        col = cols[ins.i_out].start + v * d + m
        position.append((row * linear.irreps_out.dim + col).ravel())
        weight_index.append((offset + u * mul_out + v).ravel())
        scale.append(np.full(u.size, ins.path_weight))
        offset += mul_in * mul_out
    cat = lambda parts, dt: torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0), dtype=dt)  # noqa: E731
    return cat(position, torch.long), cat(weight_index, torch.long), cat(scale, torch.float64)


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
        ``features``: this network's ``node_features(batch)`` where the caller has them already."""
        with torch.no_grad():
            x = (self.node_features(batch) if features is None else features)[:, : self.num_scalars]
            species = batch["onehot"].argmax(dim=1)
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
        scores = torch.cat([self.novelty(b) for b in batches])
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
                    sign = np.diag(np.where(np.arange(-sx.l, sx.l + 1) % 2 == 0, 1.0, -1.0))
                    c = np.trace(sign @ blk @ sign) / sx.size  # invariant part, in e3nn's basis
                    ref[starts[x]:starts[x + 1], starts[y]:starts[y + 1]] = c * np.eye(sx.size)
        out[label] = ref.reshape(-1).tolist()
    return out


def fold_to_targets(pred_flat: torch.Tensor, batch: dict) -> torch.Tensor:
    """Sum flat predictions onto the reference's stored elements (folds images for Γ-only references)."""
    idx = batch["target_index"]
    valid = idx >= 0
    out = torch.zeros_like(batch["target_values"])
    return out.index_add_(0, idx[valid], pred_flat[valid])
