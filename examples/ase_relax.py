"""A variable-cell relaxation of bulk silicon (ASE's BFGS on a FrechetCellFilter), SIESTA started from the ML guess
at every step, with 4x4x4 k-points.

    SIESTA_COMMAND=/path/to/siesta python examples/ase_relax.py PSEUDO_DIR

PSEUDO_DIR holds Si.psf (e.g. ../shared/datasets/si8/basis). The settings are those the shipped ``silicon`` model
was trained with (its card lists them); the cell starts 2 % too large, its atoms rattled by 0.05 Å.
"""

import os
import sys

from ase import units
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS

from siesta_dmguess import DMGuessSiesta

if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
    sys.exit(f"usage: python {sys.argv[0]} PSEUDO_DIR   (the folder holding Si.psf)")
missing = [f"{label}.psf" for label in ['Si'] if not os.path.isfile(os.path.join(sys.argv[1], f"{label}.psf"))]
if missing:  # said before SIESTA starts, not in its traceback
    sys.exit(f"{sys.argv[1]}: no {', '.join(missing)} in it (usage: python {sys.argv[0]} PSEUDO_DIR)")
atoms = bulk("Si", "diamond", a=5.43, cubic=True)
atoms.rattle(0.05, seed=1)
atoms.set_cell(atoms.cell * 1.02, scale_atoms=True)
atoms.calc = DMGuessSiesta(
    model="silicon",  # guess="ml+residual" (the default) corrects each prediction by the model's past errors
    xc="CA", basis_set="DZP", mesh_cutoff=200 * units.Ry, kpts=[4, 4, 4],
    pseudo_path=sys.argv[1], pseudo_qualifier="", label="siesta", directory="ase_relax_run",
    fdf_arguments={"DM.Tolerance": "1.0d-5", "SCF.Mixer.Weight": 0.25, "SCF.Mixer.History": 6},
    compare_baseline=True,  # also run SIESTA from its atomic guess, to count the iterations saved
)
BFGS(FrechetCellFilter(atoms), logfile="-").run(fmax=0.05, steps=4)
for step, record in enumerate(atoms.calc.history):
    print(f"step {step}: guess {record.guess}, {record.scf_iterations} SCF iterations "
          f"(atomic guess {record.atomic_scf_iterations}), prediction {record.prediction_s:.2f} s")
print("cell lengths (Å):", " ".join(f"{x:.4f}" for x in atoms.cell.lengths()))
