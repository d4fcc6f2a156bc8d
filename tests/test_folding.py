"""Pairs beyond SIESTA's pattern for folded Γ-only cells (ModelConfig.fold_reach, graph.extend_for_folding)."""

import numpy as np
import pytest
import torch

from siesta_dmguess.data import prepare_sample, siesta_pattern
from siesta_dmguess.evaluate import predict_flat
from siesta_dmguess.graph import extend_for_folding
from siesta_dmguess.model import DensityMatrixModel
from siesta_dmguess.structure import Structure

from .conftest import small_config, water_basis, water_box, water_molecule

REACH = 8.0


def pattern_of(atoms):
    return siesta_pattern(Structure(atoms, list(atoms.get_chemical_symbols())), water_basis())


def test_far_images_are_added_only_onto_elements_the_pattern_stores():
    atoms = water_box(3, seed=2)  # a 5 Å cell: many images within 8 Å
    pattern = pattern_of(atoms)
    edges = extend_for_folding(atoms, pattern, REACH)
    assert edges.added.sum() > len(pattern)  # the cell folds many far images
    stored = set(zip(pattern.src.tolist(), pattern.dst.tolist()))
    for e in np.nonzero(edges.added)[0]:
        assert edges.src[e] == edges.dst[e] or (edges.src[e], edges.dst[e]) in stored
        assert np.linalg.norm(edges.vectors[e]) <= REACH + 1e-9
    own = edges.added == 0
    assert own.sum() == len(pattern)
    assert np.array_equal(edges.vectors[own], pattern.vectors)
    assert np.array_equal(edges.added[edges.reverse], edges.added)  # pairs come in both directions


@pytest.mark.parametrize("atoms", [water_molecule(), water_box(3, seed=2, box=30.0)], ids=["molecule", "large-cell"])
def test_molecules_and_large_cells_keep_siestas_pattern(atoms):
    """No image of an in-range pair lies within reach: nothing is added, so large systems cost what they did."""
    pattern = pattern_of(atoms)
    edges = extend_for_folding(atoms, pattern, REACH)
    assert len(edges) == len(pattern) and not np.any(edges.added if edges.added is not None else False)


def _folded(model, atoms, reach):
    st = Structure(atoms, list(atoms.get_chemical_symbols()))
    sample = prepare_sample(st, water_basis(), model.species, model.config.message_cutoff, fold_reach=reach, fold=True)
    flat = predict_flat(model, [sample], dtype=torch.float64)[0]
    lay = sample.layout
    dense = np.zeros((lay.no, lay.no))
    np.add.at(dense, (lay.rows, lay.cols % lay.no), flat)
    return dense


def test_only_a_stage_with_a_longer_reach_predicts_the_added_pairs(float64):
    """A network of SIESTA's pattern gives the added pairs zero blocks (a shipped model folds exactly as before);
    a residual stage of the added pairs changes the folded DM through them alone."""
    atoms = water_box(2, seed=4)
    plain = DensityMatrixModel(small_config(fold_reach=REACH)).eval()
    assert np.abs(_folded(plain, atoms, REACH) - _folded(plain, atoms, 0.0)).max() < 1e-12
    staged = DensityMatrixModel(small_config(fold_reach=REACH, residual_stages=[
        {"output_scale": 0.5, "pattern_cutoff": REACH, "pair_set": "added"}])).eval()
    with torch.no_grad():
        for p in staged.residuals.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert np.abs(_folded(staged, atoms, REACH) - _folded(staged, atoms, 0.0)).max() > 1e-4
    # ... and only through them: without added pairs (a molecule, or fold_reach 0) the stage adds nothing.
    assert np.abs(_folded(staged, atoms, 0.0) - _folded(plain, atoms, 0.0)).max() < 1e-12


def test_density_loss_is_the_density_operator_error_with_siestas_overlap():
    """--density-loss: Tr[(E S)²] / n_orb of the folded error, with S from the basis, equals the dense trace with
    SIESTA's own S (.HSX) of a water8 box, with and without the pairs added for folding; an error along a
    near-null direction of S counts far less than its element size."""
    import warnings

    import sisl

    from siesta_dmguess.data import load_run
    from siesta_dmguess.train import attach_folded_overlap, density_loss

    from .conftest import dataset

    structure, basis, dm, hsx = load_run(dataset("water8") / "0004")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s_hsx = sisl.get_sile(str(hsx)).read_overlap(geometry=dm.geometry).tocsr(0).toarray()
    for reach in (0.0, REACH):
        sample = prepare_sample(structure, basis, sorted(basis), 3.0, dm, fold_reach=reach)
        attach_folded_overlap([sample], basis)
        no = sample.layout.no
        rows, cols = sample.stored_cell_positions()
        ok = rows >= 0
        residual = np.random.default_rng(0).normal(size=sample.target_values.size) * 1e-3
        error = np.zeros((no, no))
        error[rows[ok], cols[ok]] = residual[ok]
        expected = np.trace(error @ s_hsx @ error @ s_hsx) / no
        got = float(density_loss(torch.as_tensor(residual, dtype=torch.float32), [sample]))
        assert got == pytest.approx(expected, rel=1e-4)
    _, vec = np.linalg.eigh(s_hsx)

    def loss_along(k):  # a unit error along one eigenvector of S (restricted to the stored elements)
        direction = np.outer(vec[:, k], vec[:, k])
        residual = np.where(ok, direction[np.maximum(rows, 0), np.maximum(cols, 0)], 0.0)
        return float(density_loss(torch.as_tensor(residual, dtype=torch.float32), [sample]))

    assert loss_along(0) < 1e-2 * loss_along(-1)  # near-null direction vs the largest eigenvalue of S


def test_a_crystal_reference_gives_the_far_pairs_their_own_targets():
    """An unfolded reference whose supercell reaches beyond SIESTA's pattern (integration/benchmarks/
    crystal_references.py) supervises every pair within fold_reach element by element, and its fold onto the
    cell is what the model's folded prediction is compared with; a reference of SIESTA's own pattern (a k-point
    run) keeps the pattern, so a k-point prediction is written with SIESTA's supercell."""
    from siesta_dmguess.dm import density_matrix_from_flat

    atoms = water_box(3, seed=2)
    st = Structure(atoms, list(atoms.get_chemical_symbols()))
    basis, species = water_basis(), ["H", "O"]
    far = prepare_sample(st, basis, species, 3.0, fold_reach=REACH, fold=True)  # the layout a crystal DM has
    values = np.random.default_rng(1).normal(size=far.layout.size)
    values = 0.5 * (values + values[far.layout.transpose])  # a DM is symmetric
    crystal = density_matrix_from_flat(st, basis, far.layout, values, False, np.ones(far.layout.size, bool))
    sample = prepare_sample(st, basis, species, 3.0, crystal, fold_reach=REACH)
    assert not sample.fold and sample.pattern.added.sum() == far.pattern.added.sum()
    # every flat element has its own stored element (nothing is folded) and every stored element is used
    assert np.array_equal(np.sort(sample.target_index), np.arange(sample.target_values.size))
    folded = density_matrix_from_flat(st, basis, sample.layout, sample.target_values[sample.target_index], True)
    assert np.allclose(folded.tocsr(0).toarray(), density_matrix_from_flat(st, basis, far.layout, values, fold=True)
                       .tocsr(0).toarray())
    pattern_only = prepare_sample(st, basis, species, 3.0, fold=False)
    siesta_like = density_matrix_from_flat(st, basis, pattern_only.layout, np.ones(pattern_only.layout.size), False)
    kpoint = prepare_sample(st, basis, species, 3.0, siesta_like, fold_reach=REACH)
    assert len(kpoint.pattern) == len(pattern_only.pattern)
    # a k-point file holds SIESTA's orbital pattern: exactly the elements the mask keeps
    assert np.array_equal(kpoint.target_index >= 0, kpoint.in_siesta_pattern)


def _sample(atoms, fold, settings=None):
    structure = Structure(atoms, list(atoms.get_chemical_symbols()))
    structure.fdf_settings = settings or {}
    return prepare_sample(structure, water_basis(), ["H", "O"], 4.0, fold=fold)


def test_a_run_is_aliased_when_its_sampling_period_is_shorter_than_its_dm_range():
    """is_aliased (the card's training.aliased_sampling and Prediction.sampling_reason): a Γ-only 5 Å box folds
    images within its DM's range, the same box sampled by a 4x4x4 grid (period 20 Å) does not, nor does a
    molecule in a 10 Å box (its DM reaches 2 Å)."""
    from siesta_dmguess.data import dm_range, is_aliased, sampling_period

    box = water_box(3, seed=2)
    gamma = _sample(box, True)
    assert sampling_period(gamma) < dm_range(gamma) and is_aliased(gamma)
    period = 4 * np.linalg.norm(box.cell, axis=1).min()
    assert not is_aliased(_sample(box, False, {"kgrid": True, "k_supercell_length": period}))
    molecule = _sample(water_molecule(), True)
    assert dm_range(molecule) < 2.0 and not is_aliased(molecule)
    assert sampling_period(_sample(box, False, {"kgrid": True})) is None  # a k-point run without its grid


@pytest.mark.parametrize("reach", [0.0, REACH])
def test_one_shared_neighbour_search_gives_the_graphs_of_separate_searches(reach):
    """prepare_sample filters one neighbour table (graph.Neighbours) for every graph; the graphs must be those
    that ASE's own searches give, each with its rule's cutoffs (per-atom radii for the orbital overlaps and the
    projectors), on a small cell with many images."""
    from ase.neighborlist import neighbor_list

    from siesta_dmguess.basis import atom_radii
    from siesta_dmguess.graph import Neighbours, _finish, kb_member_pairs

    atoms = water_box(3, seed=2)
    structure = Structure(atoms, list(atoms.get_chemical_symbols()))
    basis = water_basis()
    orbital, kb = atom_radii(structure.labels, basis)
    # SIESTA's pattern from separate ASE searches: orbital overlaps, then pairs sharing a projector.
    i, j, S = neighbor_list("ijS", atoms, orbital, self_interaction=False)
    k, a, Sa, d = neighbor_list("ijSd", atoms, np.maximum(orbital, kb), self_interaction=True)
    keep = d < orbital[a] + kb[k]
    order = np.argsort(k[keep], kind="stable")
    k, a, Sa = k[keep][order], a[keep][order], Sa[keep][order]
    p, q = kb_member_pairs(k)
    expected = _finish(atoms, np.concatenate([i, a[p]]), np.concatenate([j, a[q]]), np.concatenate([S, Sa[q] - Sa[p]]))
    if reach:
        expected = extend_for_folding(atoms, expected, reach, Neighbours.search(atoms, reach))
    i, j, S = neighbor_list("ijS", atoms, 4.0, self_interaction=False)
    expected_mp = _finish(atoms, i, j, S)

    sample = prepare_sample(structure, basis, ["O", "H"], 4.0, fold_reach=reach, fold=True)
    for got, want in [(sample.pattern, expected), (sample.mp_edges, expected_mp)]:
        assert len(got) > 0
        for name in ("src", "dst", "shift", "vectors", "reverse"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), name
    with pytest.raises(ValueError, match="cannot give pairs"):
        Neighbours.search(atoms, 3.0).within(3.5)


def test_siestas_own_hamiltonian_folded_like_the_dm_gives_back_its_gamma_dm():
    """The folded Γ-only reference, its stored positions and the .HSX's S and H agree: the lowest N/2 states of
    SIESTA's H c = ε S c, assembled as ``integration/benchmarks/h_model.py`` assembles a learned H, give back
    SIESTA's DM of the box. A wrong fold, orbital order or sign would give another matrix."""
    import json

    from siesta_dmguess.data import load_run, read_hsx_at

    from .conftest import benchmark_script, dataset

    data = dataset("water8")
    run = next(r["id"] for r in json.loads((data / "index.json").read_text()) if r.get("has_hsx"))
    h_model = benchmark_script("h_model")
    structure, basis, dm, hsx = load_run(data / run)
    sample = prepare_sample(structure, basis, ["H", "O"], 4.0, dm)
    sample.meta["overlap"], sample.meta["hamiltonian"] = read_hsx_at(hsx, dm)
    sample.meta["dm"] = sample.target_values
    _, mae, density_error, gap = h_model.dm_from_hamiltonian(sample, sample.meta["hamiltonian"])
    assert mae < 1e-5 and density_error < 1e-3, (mae, density_error)
    assert gap > 2.0  # eV: water is an insulator, its occupied states well below the empty ones
    # an H 5 % off in its elements gives a measurably different DM: the comparison can fail
    perturbed = sample.meta["hamiltonian"] * (1 + 0.05 * np.sign(sample.meta["dm"]))
    assert h_model.dm_from_hamiltonian(sample, perturbed)[1] > 10 * mae
