"""Why spin-polarized runs are refused: an ML guess without a moment keeps SIESTA on the non-magnetic solution.

    SIESTA_COMMAND=/path/to/siesta python integration/benchmarks/spin_start.py ../shared/datasets/h2o/0004 --model water
    SIESTA_COMMAND=/path/to/siesta python integration/benchmarks/spin_start.py ../shared/datasets/g2/0048 --model chno-molecules

The models learned spin-unpolarized DMs. This runs one structure with ``Spin polarized`` added to its fdf, starting
from (1) SIESTA's atomic guess, which gives every atom its largest moment, all parallel (SIESTA's default,
``m_new_dm.F90``); (2) the ML DM split equally over the two spins, D/2 each, which has no moment; (3) the same
plus a fraction (``--seeds``) of the atomic guess's on-site moments, each orbital's min(q0, 1) − (q0 − min(q0, 1)).
For each start it prints the SCF iterations, the total energy and the converged spin moment. With D/2 the two
spins' Hamiltonians are equal at every step, so SIESTA cannot leave a moment-free solution: the start is right
for a closed-shell system and the wrong answer for a magnetic one, and no cheap rule tells them apart.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np

SPIN_LINE = "Spin polarized"  # fdf keeps a key's first value: prepended, it overrides the run's own setting


def spin_moment(out_file: Path) -> float | None:
    """The last total spin moment SIESTA printed (collinear: ``spin moment: S , {S} = M 0.0 0.0 M``)."""
    found = re.findall(r"spin moment: S , \{S\} =\s+(-?[\d.]+)", out_file.read_text(errors="replace"))
    return float(found[-1]) if found else None


def two_spin_dm(prediction, seed: float):
    """The prediction's DM as a collinear two-spin sisl DM: D/2 per spin plus ``seed`` times the atomic guess's
    on-site magnetization (half on each spin, with opposite signs)."""
    import scipy.sparse as sp
    import sisl

    single = prediction.density_matrix
    half = single.tocsr(0).tocsr() * 0.5
    q0 = np.concatenate([[orb.q0 for orb in atom.orbitals] for atom in single.geometry.atoms])
    moment = 2 * np.minimum(q0, 1.0) - q0
    shift = sp.diags(0.5 * seed * moment, shape=half.shape, format="csr")  # unit-cell diagonal: columns < no
    return sisl.DensityMatrix.fromsp(single.geometry, [half + shift, half - shift])  # a .DM stores no S


def main() -> None:
    from siesta_dmguess.data import find_fdf
    from siesta_dmguess.dm import write_density_matrix
    from siesta_dmguess.predict import predict_density_matrix
    from siesta_dmguess.siesta.runner import run_siesta
    from siesta_dmguess.siesta.templates import prepare_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a SIESTA run folder of a shared dataset (fdf; pseudopotentials in ../basis)")
    p.add_argument("--model", required=True, help="shipped model name or model folder")
    p.add_argument("--seeds", default="0.01,0.1,1", help="fractions of the atomic moments added to D/2")
    p.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="sisl")
    fdf = find_fdf(args.run)
    prediction = predict_density_matrix(fdf, args.model, force=True)
    starts = [("atomic guess", None), ("ML, D/2 per spin", 0.0)]
    starts += [(f"ML + {float(s):g} x atomic moments", float(s)) for s in args.seeds.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        print(f"{args.run} spin-polarized ({prediction.model_path.name}):")
        for k, (name, seed) in enumerate(starts):
            workdir = root / f"start{k}"
            dm_file = None
            if seed is not None:
                dm_file = workdir / "guess.DM"
                workdir.mkdir(parents=True, exist_ok=True)
                write_density_matrix(two_spin_dm(prediction, seed), dm_file, overwrite=True)
            run_fdf = prepare_run(fdf, workdir, "atomic" if seed is None else "ml", dm_file,
                                  pseudo_dirs=[args.run.parent / "basis"])
            run_fdf.write_text(SPIN_LINE + "\n" + run_fdf.read_text())
            run = run_siesta(run_fdf)
            print(f"  {name:32s} {run.output.scf_iterations:3d} SCF iterations, E = {run.output.total_energy_eV:.6f} eV, "
                  f"moment {spin_moment(run.out_file):.3f}" + ("" if seed is None or run.output.dm_read_from_file
                                                               else "  (SIESTA did not read the DM)"))


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
