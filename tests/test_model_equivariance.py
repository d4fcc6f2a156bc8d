"""End-to-end E(3) equivariance of the predicted DM in float64, symmetry and periodic images."""

import numpy as np
import pytest
import torch
from e3nn import o3
from scipy.linalg import block_diag
from scipy.spatial.transform import Rotation

from siesta_dmguess.conventions import convert_blocks, rotation_to_e3nn, shell_signs
from siesta_dmguess.data import prepare_sample
from siesta_dmguess.evaluate import predict_flat
from siesta_dmguess.model import DensityMatrixModel
from siesta_dmguess.structure import Structure

from .conftest import small_config, water_basis, water_box, water_molecule


def randomize(model, seed: int) -> None:
    """Random (not trained) weights, but non-zero everywhere: every path contributes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


pytestmark = pytest.mark.usefixtures("float64")  # every test here compares float64 numbers


@pytest.fixture(scope="module", params=["dm", "dm+correction", "dm+residual-stage", "dm+folding-stage",
                                        "dm+wider-stage"])
def model(request):
    """One model of each form, built in float64 once for the module (the tests only read it)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _random_model(request.param)
    finally:
        torch.set_default_dtype(prev)


def _random_model(form: str) -> DensityMatrixModel:
    # correction_scale 1: ΔH blocks of DM size, so the equivariance check compares real numbers.
    stages = [{"output_scale": 0.5, "num_layers": 1}] if form == "dm+residual-stage" else []
    if form == "dm+wider-stage":  # a stage whose messages reach farther than the first network's
        stages = [{"output_scale": 0.5, "num_layers": 1, "mp_cutoff": 4.5, "avg_num_neighbors": 20.0}]
    reach = 0.0
    if form == "dm+folding-stage":  # a stage that also predicts image pairs added for folding
        reach = 7.0
        stages = [{"output_scale": 0.5, "num_layers": 1, "pattern_cutoff": reach, "pair_set": "added"}]
    m = DensityMatrixModel(small_config(correction_head=form == "dm+correction", correction_scale=1.0,
                                        residual_stages=stages, fold_reach=reach))
    randomize(m, seed=1)
    return m.eval()


def blocks(model, atoms, correction=False):
    """{(i, j, shift): block} in SIESTA's basis, for a structure (of the DM, or of the ΔH head)."""
    basis = water_basis()
    st = Structure(atoms, list(atoms.get_chemical_symbols()))
    sample = prepare_sample(st, basis, model.species, model.config.message_cutoff, fold_reach=model.config.fold_reach)
    # The network's own blocks: the cut to SIESTA's orbital pairs depends on how images fold in *this* cell
    # (a cell and its supercell fold differently), and is tested in test_dm_io.
    sample.in_siesta_pattern = None
    corrections = []
    flat = predict_flat(model, [sample], dtype=torch.float64, corrections=corrections)[0]
    flat = corrections[0] if correction else flat
    lay = sample.layout
    out = {}
    for k in range(lay.block_i.size):
        i, j = lay.block_i[k], lay.block_j[k]
        ni, nj = basis[st.labels[i]].norb, basis[st.labels[j]].norb
        out[(int(i), int(j), tuple(lay.block_shift[k]))] = flat[lay.block_offset[k]:lay.block_offset[k + 1]].reshape(ni, nj)
    return out, sample


def wigner_siesta(label, rot, basis=None):
    """Block-diagonal rotation of one atom's orbitals, in SIESTA's basis (handles improper rotations)."""
    det = np.linalg.det(rot)
    proper = rot * det  # the proper part; inversion acts as (-1)^l
    re3 = torch.tensor(rotation_to_e3nn(proper))
    mats = []
    for s in (basis or water_basis())[label].shells:
        d = o3.Irrep(s.l, (-1) ** s.l).D_from_matrix(re3).numpy() * (det ** s.l)
        mats.append(convert_blocks(d, shell_signs(s.l), shell_signs(s.l)))
    return block_diag(*mats)


@pytest.mark.parametrize("improper", [False, True])
@pytest.mark.parametrize("periodic", [False, True])
def test_rotation_translation_inversion(model, periodic, improper):
    atoms = water_box(3, seed=2) if periodic else water_molecule()
    rot = Rotation.random(random_state=3).as_matrix() * (-1 if improper else 1)
    moved = atoms.copy()
    moved.positions = atoms.positions @ rot.T + np.array([0.7, -1.3, 2.1])
    moved.cell = np.asarray(atoms.cell) @ rot.T
    for correction in [False, True] if model.correction_node_head is not None else [False]:
        ref, _ = blocks(model, atoms, correction)
        got, _ = blocks(model, moved, correction)
        assert set(ref) == set(got)
        labels = atoms.get_chemical_symbols()
        wigner = {label: wigner_siesta(label, rot) for label in set(labels)}  # once per species, not per block
        worst = 0.0
        for (i, j, S), b in ref.items():
            expected = wigner[labels[i]] @ b @ wigner[labels[j]].T
            worst = max(worst, np.abs(got[(i, j, S)] - expected).max())
        assert worst < 1e-8
        assert max(np.abs(b).max() for b in ref.values()) > 1e-3  # the test compares real numbers


def test_atom_permutation(model):
    atoms = water_box(3, seed=5)
    perm = np.random.default_rng(0).permutation(len(atoms))
    ref, _ = blocks(model, atoms)
    got, _ = blocks(model, atoms[perm])
    inv = np.argsort(perm)
    for (i, j, S), b in ref.items():
        assert np.abs(got[(int(inv[i]), int(inv[j]), S)] - b).max() < 1e-10


def test_symmetric_and_electron_reference(model):
    atoms = water_box(3, seed=7)
    ref, sample = blocks(model, atoms)
    for (i, j, S), b in ref.items():
        partner = ref[(j, i, tuple(-np.array(S)))]
        assert np.abs(b - partner.T).max() < 1e-12
    assert sample.layout.atomic.sum() == pytest.approx(8.0 * 3)  # q0: 6 (O) + 2 x 1 (H) per molecule


def test_supercell_gives_same_blocks(model):
    """A periodic structure and its 2x1x1 supercell: every pair block is the same. (With pairs added for folding,
    the supercell has some the cell has not, by design: those fold onto the cell's elements only in the cell.)"""
    atoms = water_box(3, seed=9)
    big = atoms.repeat((2, 1, 1))
    ref, _ = blocks(model, atoms)
    got, _ = blocks(model, big)
    n = len(atoms)
    cell, bigcell = np.asarray(atoms.cell), np.asarray(big.cell)
    checked = 0
    for (i, j, S), b in got.items():
        # atom j + n*t of the supercell is atom j of the unit cell shifted by t along a1
        if i >= n:
            continue
        jj = j % n
        vec = big.positions[j] + np.array(S) @ bigcell - big.positions[i]
        unit_shift = np.rint(np.linalg.solve(cell.T, vec - (atoms.positions[jj] - atoms.positions[i]))).astype(int)
        key = (i, jj, tuple(unit_shift)) if (i != jj or np.any(unit_shift)) else (i, i, (0, 0, 0))
        if key not in ref:
            assert model.config.fold_reach > 0
            continue
        assert np.abs(ref[key] - b).max() < 1e-10
        checked += 1
    assert checked == sum(1 for k in got if k[0] < n) or model.config.fold_reach and checked > len(atoms) ** 2


def test_a_network_uses_only_its_own_message_edges(float64):
    """Samples carry edges up to the model's longest cutoff (a wider residual stage); the first network must see
    exactly the edges within its own, or adding such a stage would change what the frozen network predicts."""
    m = DensityMatrixModel(small_config())
    randomize(m, seed=2)
    m.eval()
    atoms = water_box()
    st = Structure(atoms, list(atoms.get_chemical_symbols()))
    own = prepare_sample(st, water_basis(), m.species, m.config.mp_cutoff)
    wider = prepare_sample(st, water_basis(), m.species, m.config.mp_cutoff + 1.5)
    assert len(wider.mp_edges) > len(own.mp_edges)
    a, b = (predict_flat(m, [s], dtype=torch.float64)[0] for s in (own, wider))
    assert np.abs(a - b).max() < 1e-12


@pytest.mark.parametrize("mp_switch", [0.0, 0.1, 0.25])
def test_prediction_is_continuous_as_a_neighbour_crosses_the_message_cutoff(float64, mp_switch):
    """Along MD the ml+residual guess extrapolates the model's own error from past steps, so a prediction that
    jumps when an atom crosses mp_cutoff spoils it. Without the fade-out (mp_switch 0, models trained before
    it) the radial MLP's biases give an edge a finite message the moment it enters: the jump this test sees."""
    m = DensityMatrixModel(small_config(mp_switch=mp_switch, residual_stages=[{"output_scale": 0.5, "num_layers": 1}]))
    randomize(m, seed=4)
    m.eval()
    molecule = water_molecule()
    nearest = molecule.positions[np.argmax(molecule.positions[:, 0])]
    dm = []
    for distance in (m.config.mp_cutoff - 1e-7, m.config.mp_cutoff + 1e-7):
        atoms = molecule.copy()  # one more H atom on the x axis of the molecule's outermost atom
        atoms.append("H")
        atoms.positions[-1] = nearest + [distance, 0.0, 0.0]
        d = np.linalg.norm(atoms.positions[:-1] - atoms.positions[-1], axis=1)
        assert np.sort(d)[1] > m.config.mp_cutoff + 0.1  # only one edge crosses
        dm.append(blocks(m, atoms)[0])
    assert dm[0].keys() == dm[1].keys()  # SIESTA's pattern (orbital overlap) holds the pair on both sides
    jump = max(np.abs(dm[0][k] - dm[1][k]).max() for k in dm[0])
    if mp_switch > 0:
        assert jump < 1e-9
    else:
        assert jump > 1e-4


def test_channelwise_product_is_e3nns_uvu_tensor_product(float64):
    """The hand-written product is e3nn's TensorProduct with 'uvu' paths and per-edge weights (component
    normalization, no path normalization): same Clebsch-Gordan algebra, same weight layout."""
    from siesta_dmguess.layers import ChannelwiseTensorProduct

    torch.manual_seed(1)
    irreps_in, irreps_sh = o3.Irreps("6x0e + 4x1o + 3x1e + 2x2e + 2x2o"), o3.Irreps.spherical_harmonics(3)
    tp = ChannelwiseTensorProduct(irreps_in, irreps_sh, "0e + 1o + 1e + 2e + 2o + 3o + 3e")
    reference = o3.TensorProduct(irreps_in, irreps_sh, tp.irreps_out,
                                 [(i, j, k, "uvu", True) for k, (i, j, _) in enumerate(tp.paths)],
                                 shared_weights=False, internal_weights=False, irrep_normalization="component",
                                 path_normalization="none")
    x = torch.randn(9, irreps_in.dim)
    sh = o3.spherical_harmonics(irreps_sh, torch.randn(9, 3), normalize=True)
    weight = torch.randn(9, tp.weight_numel)
    ours, theirs = tp(x, sh, weight), reference(x, sh, weight)
    assert reference.weight_numel == tp.weight_numel and theirs.abs().max() > 0.5
    assert torch.allclose(ours, theirs, atol=1e-12)


def test_fused_linear_contraction_matches_the_product_then_the_linear(float64):
    """The edge readout contracts each tensor-product path with its block of the output Linear instead of
    forming the product's wide output; values and gradients must equal the two steps done one after the other."""
    from siesta_dmguess.layers import ChannelwiseTensorProduct, dense_matrix

    torch.manual_seed(0)
    irreps_in, irreps_sh = o3.Irreps("6x0e + 4x1o + 3x1e + 2x2e"), o3.Irreps.spherical_harmonics(3)
    tp = ChannelwiseTensorProduct(irreps_in, irreps_sh, "0e + 1o + 1e + 2e + 2o + 3o")
    linear = o3.Linear(tp.irreps_out, o3.Irreps("5x0e + 3x1o + 2x2e + 2x3o + 1x4e"))  # 4e: no path makes it
    with torch.no_grad():
        linear.weight.add_(torch.randn_like(linear.weight))
    x = torch.randn(7, irreps_in.dim)
    sh = o3.spherical_harmonics(irreps_sh, torch.randn(7, 3), normalize=True)
    weight = torch.randn(7, tp.weight_numel, requires_grad=True)
    probe = torch.randn(7, linear.irreps_out.dim)
    fused = tp(x, sh, weight, linear=linear)
    stepwise = tp(x, sh, weight) @ dense_matrix(linear)
    assert fused.shape == stepwise.shape and torch.allclose(fused, stepwise, atol=1e-12)
    assert stepwise.abs().max() > 0.1 and torch.all(fused[:, -9:] == 0)  # real values; the unmade 4e stays zero
    grads = [torch.autograd.grad((out * probe).sum(), [weight, linear.weight])
             for out in (tp(x, sh, weight, linear=linear), tp(x, sh, weight) @ dense_matrix(linear))]
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(*grads))
    assert tp(x[:0], sh[:0], weight[:0], linear=linear).shape == (0, linear.irreps_out.dim)  # no pairs at all


@pytest.mark.parametrize("lmax_sh_mp", [2, 3, 4, None])
def test_a_diamond_site_sees_its_octupole_and_cubic_field(float64, lmax_sh_mp):
    """In a diamond lattice every site has Td symmetry, so every l = 1, 2 sum over neighbours vanishes, at every
    site and every layer: the lowest harmonics the environment has are l = 3 (the xyz octupole, which gives the
    on-site p–d block) and l = 4 (the cubic field, which splits the on-site d block into e and t2). Message passing
    whose spherical harmonics stop at l = 2 sees neither and predicts both exactly zero: a measured blind spot of
    the silicon models before 2026-12-01 (``docs/studies.md``). ``None``: the default config sees both."""
    from ase.build import bulk

    from siesta_dmguess.model import ModelConfig

    lmax = ModelConfig.lmax_sh_mp if lmax_sh_mp is None else lmax_sh_mp
    sees = lmax_sh_mp is None or lmax_sh_mp >= 3
    m = DensityMatrixModel(small_config(hidden_irreps="8x0e + 4x1o + 2x1e + 2x2e + 2x2o + 2x3o + 2x3e + 2x4e",
                                        lmax_sh_mp=lmax))
    randomize(m, seed=1)
    crystal = bulk("C", "diamond", a=3.0, cubic=True)  # neighbours at 1.30 and 2.12 Å, within mp_cutoff = 3 Å
    crystal.set_chemical_symbols(["O"] * len(crystal))  # any species with p and d shells
    onsite = blocks(m.eval(), crystal)[0][(0, 0, (0, 0, 0))]  # s, s, p (y z x), p, d (xy yz z2 xz x2-y2)
    p_d, d_d = onsite[2:5, 8:], onsite[8:, 8:]
    assert (np.abs(p_d).max() > 1e-6) == sees, f"on-site p-d block {np.abs(p_d).max():.1e}"
    e_t2 = d_d[[2, 4], [2, 4]].mean() - d_d[[0, 1, 3], [0, 1, 3]].mean()
    assert (abs(e_t2) > 1e-6) == sees, f"e - t2 splitting {e_t2:.1e}"
    assert np.allclose(d_d, np.diag(np.diag(d_d)), atol=1e-10)  # Td: no other d-d coupling


@pytest.mark.parametrize("pair_irreps", ["4x0e + 2x1o + 2x1e + 2x2e + 2x2o", None])
def test_a_pair_along_a_cube_axis_of_diamond_sees_the_octupole(float64, pair_irreps):
    """The octupole of a diamond site also carries a pair element: p_z of an atom with d_xy of its own image one
    cube edge away along z (SIESTA: -6.3e-3 / +6.3e-3 on the two sublattices of silicon). For a pair along z the
    harmonics of the pair vector have no xy part, so the readout can only get it from the atoms' own l = 3
    features; with pair features of l <= 2 (``pair_irreps``, the silicon model shipped before 2026-12-02) it is
    exactly zero. ``None``: the default config sees it."""
    from ase.build import bulk

    from siesta_dmguess.model import ModelConfig

    irreps = ModelConfig.pair_irreps if pair_irreps is None else pair_irreps
    m = DensityMatrixModel(small_config(hidden_irreps="8x0e + 4x1o + 2x1e + 2x2e + 2x2o + 2x3o + 2x3e + 2x4e",
                                        lmax_sh_mp=4, pair_irreps=irreps))
    randomize(m, seed=1)
    crystal = bulk("C", "diamond", a=3.0, cubic=True)
    crystal.set_chemical_symbols(["O"] * len(crystal))  # any species with p and d shells
    pairs, _ = blocks(m.eval(), crystal)
    # s, s, p (y z x), p, d (xy yz z2 xz x2-y2): p_z of both shells against d_xy, on both sublattices
    p_z_d_xy = np.array([pairs[(a, a, (0, 0, 1))][[3, 6], 8] for a in (0, 1)])
    sees = pair_irreps is None
    assert (np.abs(p_z_d_xy).max() > 1e-6) == sees, p_z_d_xy
    if sees:  # the two sublattices are mirror images (inversion): opposite signs
        assert np.allclose(p_z_d_xy[0], -p_z_d_xy[1], atol=1e-10)


def test_inference_in_chunks_of_edges_gives_the_same_dm(model):
    """Large systems sum their messages and read out their pairs a few thousand edges at a time (bounded memory);
    chunks of a handful of edges must give the DM of one pass over all edges."""
    atoms = water_box(seed=3)
    whole, _ = blocks(model, atoms)
    networks = [model, *model.residuals]
    layers = [layer for net in networks for layer in net.layers]
    assert layers and all(hasattr(layer, "edge_chunk") for layer in layers)
    chunk = {id(module): module.edge_chunk for module in networks + layers}
    try:
        for module in networks + layers:
            module.edge_chunk = 7
        chunked, _ = blocks(model, atoms)
    finally:  # the model is the module's: later tests get it as it was
        for module in networks + layers:
            module.edge_chunk = chunk[id(module)]
    assert whole.keys() == chunked.keys()
    assert max(np.abs(whole[k] - chunked[k]).max() for k in whole) < 1e-12


def test_the_fitted_onsite_reference_is_invariant_under_rotation():
    """The on-site blocks a trained model starts from (the mean of the training DMs' invariant parts) rotate into
    themselves: a mean block kept whole would tie every prediction to the training structures' orientation.
    The random-weight models above have no such reference; every trained and shipped model has one."""
    from siesta_dmguess.data import load_samples, run_basis
    from siesta_dmguess.model import onsite_reference

    from .conftest import dataset

    path = dataset("h2o")
    basis = run_basis(path / "0000", {"H", "O"})
    samples = load_samples([path], ["H", "O"], basis, 4.0, split="train")[:6]
    reference = onsite_reference(samples, ["H", "O"], basis)
    rot = Rotation.random(random_state=11).as_matrix()
    for label, values in reference.items():
        block = np.asarray(values).reshape(basis[label].norb, basis[label].norb)
        w = wigner_siesta(label, rot, basis)
        assert np.abs(w @ block @ w.T - block).max() < 1e-12, label
        assert np.abs(block).max() > 0.1  # a real reference, not zeros
