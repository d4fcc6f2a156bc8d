"""The network's building blocks (torch + e3nn): radial features, the channel-wise tensor product with its fused
linear, the message-passing interaction, the pair readout and the species-wise normalization and embeddings.

:mod:`siesta_dmguess.model` assembles them into the density-matrix model. Each block is equivariant on its own
(``tests/test_model_equivariance.py``); e3nn provides the irreps, spherical harmonics, Clebsch-Gordan
coefficients, linears and gates, and these modules only arrange them (or, where e3nn's generic kernels were slow
on CPU, do the same algebra in fewer, larger operations: :class:`ChannelwiseTensorProduct`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .e3nn_modules import nn as e3nn_nn
from .e3nn_modules import o3


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
