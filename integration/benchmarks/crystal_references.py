"""Unfolded training targets for small Γ-only cells: the crystal's DM on every image pair within a reach.

    SIESTA_COMMAND=/path/to/siesta python integration/benchmarks/crystal_references.py \\
        ../shared/datasets/water8 --split train --reach 9 --out crystal-water8

A Γ-only run of a small cell stores each DM element (i, j) summed over every image
of j (``integration/benchmarks/folding_reach.py``). That sum is not a local function
of one atom pair; the crystal's DM D(i, j + R) is (though, measured on the water
boxes, it is no easier to learn element by element: README, Limitations). For each periodic Γ-only run this script reruns SIESTA with a
k-grid (``SaveHS``), diagonalizes its H(k), S(k) on a denser Born-von Kármán grid,
and writes D(R) for every atom pair within ``--reach`` Å (SIESTA's pattern plus the
pairs a model with ``ModelConfig.fold_reach`` adds: :func:`siesta_dmguess.graph.
extend_for_folding`) as a ``.DM`` with the supercell those pairs need. A model
with that ``fold_reach`` trains on it element by element (no folding) and, on a
Γ-only cell, folds its blocks as SIESTA's Γ DM does.

The output folder is a dataset (``index.json``; split ``train``); ``--val DIR`` adds
a dataset's val runs to it by absolute path, so ``train OUT`` validates on the
Γ-only references the shipped model is judged by. Molecules and k-point runs are
skipped (their DM is already unfolded).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def crystal_density_matrix(hamiltonian, n_occupied: int, grid: int) -> dict[tuple, np.ndarray]:
    """D(R) (orbitals of the cell x orbitals of image R) for R on a grid^3 Born-von Kármán supercell.

    D(R) = (1/N_k) sum_k 2 C_occ(k) C_occ(k)^H exp(-i k.R) in sisl's lattice gauge (folding_reach.py checks it:
    folded over all images it reproduces SIESTA's Γ DM to MAE 9e-5); an FFT over the grid gives every R at
    once. Integer occupations: these are insulators (a 3 eV Γ gap for water) at SIESTA's 300 K.
    """
    import scipy.linalg

    no = hamiltonian.no
    projector = np.zeros((grid, grid, grid, no, no), complex)
    for a in range(grid):
        for b in range(grid):
            for c in range(grid):
                k = np.array([a, b, c]) / grid
                _, vec = scipy.linalg.eigh(hamiltonian.Hk(k=k, format="array"), hamiltonian.Sk(k=k, format="array"))
                occ = vec[:, :n_occupied]
                projector[a, b, c] = 2 * occ @ occ.conj().T
    d = np.fft.fftn(projector, axes=(0, 1, 2)).real / grid**3
    half = grid // 2
    return {r: d[r[0] % grid, r[1] % grid, r[2] % grid]
            for r in np.ndindex(grid, grid, grid) for r in [tuple(int(x) - half for x in r)]}


def crystal_reference(run: Path, workdir: Path, kgrid: int, bvk: int, reach: float):
    """(sisl DensityMatrix of the crystal on pairs within ``reach``, SCF iterations of the k-run) for a run."""
    from gamma_vs_kpoints import kpoint_rerun  # same folder

    from siesta_dmguess.data import load_run, siesta_pattern
    from siesta_dmguess.dm import build_geometry, build_layout, density_matrix_from_flat
    from siesta_dmguess.graph import extend_for_folding

    structure, basis, _, _ = load_run(run)
    geometry = build_geometry(structure, basis)
    result, hamiltonian, _ = kpoint_rerun(run, workdir, kgrid, geometry)
    n_occupied = int(round(sum(basis[l].valence for l in structure.labels) / 2))  # neutral cells (NetCharge 0)

    pairs = extend_for_folding(structure.atoms, siesta_pattern(structure, basis), reach)  # as prepare_sample does
    grid = max(bvk, 2 * int(np.abs(pairs.shift).max()) + 3)  # every R distinct, and aliasing ≥ one cell away
    crystal = crystal_density_matrix(hamiltonian, n_occupied, grid)
    lattice = build_geometry(structure, basis, nsc=pairs.nsc).lattice
    layout = build_layout(structure, basis, pairs, lattice)
    by_image = np.stack([crystal[tuple(int(x) for x in offset)] for offset in lattice.sc_off])
    values = by_image[layout.cols // layout.no, layout.rows, layout.cols % layout.no]
    every = np.ones(layout.size, bool)  # the far pairs are the point here, not SIESTA's pattern
    return density_matrix_from_flat(structure, basis, layout, values, False, every), result.output.scf_iterations


def main() -> None:
    from tqdm.auto import tqdm

    from siesta_dmguess.data import find_fdf, list_runs
    from siesta_dmguess.dm import write_density_matrix

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="+", type=Path, help="dataset folders of converged Γ-only runs")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", default="train", help="which runs to convert ('' for all)")
    p.add_argument("--val", type=Path, action="append", default=[],
                   help="add this dataset's val runs (by absolute path, unchanged) as the output's val split")
    p.add_argument("--reach", type=float, default=9.0, help="Å; the model's fold_reach")
    p.add_argument("--kgrid", type=int, default=3, help="SCF k-grid of the rerun")
    p.add_argument("--bvk", type=int, default=5, help="k-grid on which D(R) is built from the rerun's H")
    p.add_argument("--jobs", type=int, default=1, help="SIESTA runs at a time (each is serial)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="sisl")
    args.out.mkdir(parents=True, exist_ok=True)
    index_path = args.out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else []
    done = {r["id"] for r in index}
    todo = []
    for data in args.data:
        for rec in list_runs(data):
            if (args.split and rec.split != args.split) or not rec.meta.get("periodic") or rec.meta.get("kgrid"):
                continue
            rid = f"{data.name}-{rec.id}"
            if rid not in done:
                todo.append((rid, rec))

    def convert(item):
        rid, rec = item
        with tempfile.TemporaryDirectory() as tmp:
            dm, iterations = crystal_reference(rec.folder, Path(tmp), args.kgrid, args.bvk, args.reach)
        folder = args.out / rid
        folder.mkdir(exist_ok=True)
        shutil.copy(find_fdf(rec.folder), folder / "input.fdf")
        for ion in list(rec.folder.glob("*.ion.xml")) + list((rec.folder.parent / "basis").glob("*.ion.xml")):
            shutil.copy(ion, folder / ion.name)
        write_density_matrix(dm, folder / "siesta.DM", overwrite=True)
        return {"id": rid, "split": "train", "source": str(rec.folder.resolve()), "periodic": True,
                "crystal_reach": args.reach, "kgrid": None, "k_scf_grid": args.kgrid, "bvk_grid": args.bvk,
                "k_scf_iterations": iterations}

    with ThreadPoolExecutor(args.jobs) as pool:
        for entry in tqdm(pool.map(convert, todo), total=len(todo), desc="crystal references"):
            index.append(entry)
            index_path.write_text(json.dumps(index, indent=1))
    vals = [{"id": str(rec.folder.resolve()), "split": "val", "periodic": rec.meta.get("periodic")}
            for v in args.val for rec in list_runs(v) if rec.split == "val"]
    index = [r for r in index if r["split"] != "val"] + vals
    index_path.write_text(json.dumps(index, indent=1))
    print(f"{args.out}: {sum(r['split'] == 'train' for r in index)} crystal references, {len(vals)} val runs")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
