"""The ΔH head: a Hamiltonian-like correction whose blocks steer the idempotent projection of a predicted DM
(``refine.nearest_idempotent``), so that the written DM spans the occupied space of −S P S + ΔH. It is trained
after the DM model, with that model frozen, through the same dense projection that ``predict`` applies, written
here differentiably in torch (``docs/guesses.md``).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import InputFileError
from .model import DensityMatrixModel, collate

if TYPE_CHECKING:
    from .train import TrainOptions

log = logging.getLogger(__name__)


def train_correction(model: DensityMatrixModel, train_set, val_set, overlap, options: TrainOptions) -> list:
    """Train the model's ΔH head so that the idempotent projection of its DM matches the reference.

    The DM model is frozen (its linear-scaling output stays what it was); only the
    ΔH readouts learn, with the loss taken after the same dense projection that
    ``predict`` applies (:func:`projected_density_torch`,
    float64). The loss adds two errors of the projected DM, E = D - D_ref on the
    DM's pattern: Tr(E S E S), the error of the electron density itself (in a
    condensed phase S has eigenvalues ~1e-3, and element errors along those
    directions barely change the density or SIESTA's first Hamiltonian), and the
    mean squared element error that ``evaluate`` reports. Each is taken relative to
    its value for ΔH = 0, so molecules and periodic boxes, whose errors differ by
    10x, weigh alike. Structures whose projection does not apply (k-point
    references, odd electron counts) are skipped. Keeps the weights with the
    lowest validation loss; ΔH = 0 (the plain projection) is one of the candidates: an inherited head that does
    worse than none on the current DM model is reset to zero before training.
    """
    from tqdm.auto import tqdm

    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("correction_"))
    prepared = [p for p in (_projection_inputs(model, s, overlap) for s in train_set) if p is not None]
    prepared_val = [p for p in (_projection_inputs(model, s, overlap) for s in val_set) if p is not None]
    if not prepared:
        raise InputFileError("no training structure gets the dense projection (Γ-only, even electron count): "
                             "nothing for ΔH to learn",
                             train_set[0].name)
    rng = np.random.default_rng([options.seed, 1])
    per_step = max(1, options.batch_atoms // max(1, int(np.mean([p["natoms"] for p in prepared]))))

    def val_loss() -> float:
        with torch.no_grad():
            return float(np.mean([_projection_loss(model, p).item() for p in prepared_val])) if prepared_val else 0.0

    # A head inherited from --init was trained for the DM it steered then; on a DM changed since (a residual
    # stage, more epochs) it can be far worse than none. The plain projection (loss 2 by construction: each term
    # is relative to it) is then where training starts.
    if prepared_val and val_loss() > 2.0:
        log.info("the inherited ΔH head is worse than none on the current DM model; retraining it from ΔH = 0")
        with torch.no_grad():
            model.correction_node_head.weight.zero_()
            model.correction_edge_head.linear_out.weight.zero_()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=options.correction_lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.05 ** (1.0 / max(options.correction_epochs, 1)))
    best = {"loss": val_loss(), "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    history = []
    bar = tqdm(range(options.correction_epochs), desc="training ΔH", disable=not options.progress, file=sys.stderr)
    for epoch in bar:
        losses = []
        order = rng.permutation(len(prepared))
        for start in range(0, len(order), per_step):
            chunk = order[start:start + per_step]
            loss = sum(_projection_loss(model, prepared[k]) for k in chunk) / len(chunk)
            opt.zero_grad()
            loss.backward()
            # Relative losses of near-perfect molecules have steep gradients at ΔH = 0: bound the first steps.
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            losses.append(loss.item())
        sched.step()
        record = {"epoch": options.epochs + epoch, "stage": "ΔH", "train_density_error": np.mean(losses)}
        if prepared_val and (epoch % options.eval_every == 0 or epoch == options.correction_epochs - 1):
            record["val_density_error"] = val_loss()
            if record["val_density_error"] < best["loss"]:
                best = {"loss": record["val_density_error"],
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        history.append(record)
        bar.set_postfix(train=f"{record['train_density_error']:.3f}", val=f"{best['loss']:.3f}")
    model.load_state_dict(best["state"])
    for param in model.parameters():
        param.requires_grad_(True)
    return history


def gets_projection(sample) -> bool:
    """Whether predict projects this structure's DM (the dense idempotent projection the ΔH head acts through)."""
    from .predict import expected_electrons
    from .refine import is_kpoint, projection_skipped

    lay = sample.layout
    return not projection_skipped("idempotent", lay.no, is_kpoint(lay, sample.fold),
                                  expected_electrons(sample.structure, lay.atomic.sum()))


def _projection_inputs(model, sample, overlap) -> dict | None:
    """Everything the ΔH loss of one structure needs that does not change while ΔH trains (frozen DM model)."""
    from .dm import flat_to_csr

    from .predict import expected_electrons

    lay = sample.layout
    n_electrons = expected_electrons(sample.structure, lay.atomic.sum())
    if not gets_projection(sample):
        return None  # predict would not project this structure either
    batch = collate([sample], len(model.species), torch.float32, with_targets=False)
    with torch.no_grad():
        h = model.node_features(batch)
        density = model.density_from_features(h, batch).double().numpy()
    s_flat = overlap.flat(sample.structure, lay)
    rows, cols = sample.stored_cell_positions()
    reference = np.zeros((lay.no, lay.no))
    reference[rows[rows >= 0], cols[rows >= 0]] = sample.target_values[rows >= 0]
    pattern = np.zeros((lay.no, lay.no))
    pattern[lay.rows, lay.cols % lay.no] = 1.0
    as_t = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    inputs = {"batch": batch, "h": h, "natoms": sample.species.size, "n_occupied": int(round(n_electrons / 2)),
              "density": as_t(flat_to_csr(lay, density, True).toarray()),
              "overlap": as_t(flat_to_csr(lay, s_flat, True).toarray()),
              "fold_index": torch.as_tensor(lay.rows * lay.no + lay.cols % lay.no), "no": lay.no,
              "reference": as_t(reference), "pattern": as_t(pattern), "plain_loss": [1.0, 1.0]}
    inputs["plain_loss"] = [float(x) for x in _projection_errors(model, inputs, plain=True)]
    return inputs


def _projection_loss(model, p: dict) -> torch.Tensor:
    """Density and element errors of the projected prediction, each relative to the plain projection's."""
    density, elements = _projection_errors(model, p)
    return density / p["plain_loss"][0] + elements / p["plain_loss"][1]


def _projection_errors(model, p: dict, plain: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(Tr(E S E S), mean E²) of the projected prediction (``plain=True``: ΔH = 0), E on the DM's sparsity
    pattern (what SIESTA reads)."""
    correction = torch.zeros(p["fold_index"].shape[0], dtype=torch.float64) if plain else \
        model.correction_from_features(p["h"], p["batch"]).double()
    folded = torch.zeros(p["no"] * p["no"], dtype=torch.float64).index_add(0, p["fold_index"], correction)
    projected = projected_density_torch(p["density"], p["overlap"], folded.reshape(p["no"], p["no"]),
                                        p["n_occupied"])
    error = (projected - p["reference"]) * p["pattern"]
    es = error @ p["overlap"]
    return torch.sum(es * es.T), torch.sum(error**2) / p["pattern"].sum()


def projected_density_torch(d, s, correction, n_occupied: int):
    """Differentiable :func:`~siesta_dmguess.refine.nearest_idempotent` (dense torch tensors, S constant): the
    training loss of a model's ``correction`` head goes through the same projection that ``predict`` applies."""
    s = 0.5 * (s + s.T)
    h = -(s @ (0.25 * (d + d.T)) @ s) + 0.5 * (correction + correction.T)
    chol = torch.linalg.cholesky(s)
    # A = L^-1 H L^-T: the generalized problem in an orthonormal basis; D = 2 L^-T P_occ(A) L^-1.
    a = torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol, h, upper=False).T, upper=False)
    p = _OccupiedProjector.apply(0.5 * (a + a.T), n_occupied)
    x = torch.linalg.solve_triangular(chol.T, p, upper=True)
    return 2.0 * torch.linalg.solve_triangular(chol.T, x.T, upper=True).T


class _OccupiedProjector(torch.autograd.Function):
    """P = U_occ U_occᵀ of a symmetric matrix with a hand-written backward.

    torch's eigh backward divides by every eigenvalue difference, including those
    inside the (often degenerate) occupied space, which gives NaN; the projector
    only depends on occupied-empty pairs, separated by the gap (first-order
    perturbation theory: dP = Σ_ia u_a u_aᵀ dA u_i u_iᵀ / (ε_i - ε_a) + h.c.).
    """

    @staticmethod
    def forward(ctx, a, n_occupied):
        energies, vectors = torch.linalg.eigh(a)
        occ, emp = vectors[:, :n_occupied], vectors[:, n_occupied:]
        ctx.save_for_backward(energies, occ, emp)
        ctx.n_occupied = n_occupied
        return occ @ occ.T

    @staticmethod
    def backward(ctx, grad):
        energies, occ, emp = ctx.saved_tensors
        n = ctx.n_occupied
        g = 0.5 * (grad + grad.T)
        denom = energies[:n][None, :] - energies[n:][:, None]  # (empty, occupied): ε_i - ε_a < 0
        denom = torch.where(denom.abs() < 1e-3, torch.full_like(denom, -1e-3), denom)
        m = emp @ (2.0 * (emp.T @ g @ occ) / denom) @ occ.T
        return 0.5 * (m + m.T), None
