"""A few steps of ASE molecular dynamics with SIESTA started from the ML guess at every step.

    SIESTA_COMMAND=/path/to/siesta python examples/ase_md.py PSEUDO_DIR

PSEUDO_DIR holds O.psf and H.psf (e.g. ../shared/datasets/h2o/basis). The calculator takes ASE's ``Siesta``
arguments; these reproduce the settings the shipped ``water`` model was trained with (its card lists them).
"""

import os
import sys

import numpy as np
from ase import units
from ase.io import read
from ase.md.verlet import VelocityVerlet

from siesta_dmguess import DMGuessSiesta

if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
    sys.exit(f"usage: python {sys.argv[0]} PSEUDO_DIR   (the folder holding O.psf and H.psf)")
missing = [f"{label}.psf" for label in ['O', 'H'] if not os.path.isfile(os.path.join(sys.argv[1], f"{label}.psf"))]
if missing:  # said before SIESTA starts, not in its traceback
    sys.exit(f"{sys.argv[1]}: no {', '.join(missing)} in it (usage: python {sys.argv[0]} PSEUDO_DIR)")
atoms = read(os.path.join(os.path.dirname(__file__), "water.xyz"))
atoms.set_velocities(np.random.default_rng(0).normal(0, 0.01, (len(atoms), 3)))
atoms.calc = DMGuessSiesta(
    model="water",  # guess="ml+residual" (the default) corrects each prediction by the model's past errors
    xc="CA", basis_set="DZP", mesh_cutoff=200 * units.Ry,  # energy_shift defaults to SIESTA's 0.02 Ry
    pseudo_path=sys.argv[1], pseudo_qualifier="", label="siesta", directory="ase_md_run",  # SIESTA: $SIESTA_COMMAND,
    # ASE's configuration or PATH, as for the siesta-dmguess commands (or pass command= / profile= as to ASE's Siesta)
    fdf_arguments={"DM.Tolerance": "1.0d-5", "SCF.Mixer.Weight": 0.25, "SCF.Mixer.History": 6},
    compare_baseline=True,  # also run SIESTA from its atomic guess, to count the iterations saved
)
VelocityVerlet(atoms, 0.5 * units.fs).run(3)
for step, record in enumerate(atoms.calc.history):
    print(f"step {step}: guess {record.guess}, {record.scf_iterations} SCF iterations "
          f"(atomic guess {record.atomic_scf_iterations}), prediction {record.prediction_s:.2f} s"
          + (f" (and {record.startup_s:.1f} s of start-up, once: loading and warming up the model, the overlap "
             "tables)" if record.startup_s else ""))
