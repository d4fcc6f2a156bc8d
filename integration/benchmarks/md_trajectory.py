"""Run a short ASE molecular dynamics (or, with --relax, a BFGS relaxation) with DMGuessSiesta; write the trajectory.

The trajectory is the input of the trajectory benchmark, which then compares
starting guesses frame by frame on the same geometries:

    SIESTA_COMMAND=/path/to/siesta python integration/benchmarks/md_trajectory.py \\
        ../shared/datasets/water8/0004/input.fdf --steps 20 --out water8_md.traj
    siesta-dmguess bench water8_md.traj --fdf ../shared/datasets/water8/0004/input.fdf --model water

A relaxation from a rattled structure instead of MD:

    python integration/benchmarks/md_trajectory.py FDF --relax 0.05 --rattle 0.1 --steps 20 --out relax.traj

The SIESTA settings (basis, XC, mesh, SCF tolerances) are taken from the fdf, so
the frames are computed exactly as the dataset's structures were. Prints the SCF
iterations of every MD step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ase import units
from ase.io import Trajectory
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet

try:  # ASE >= 3.29; MaxwellBoltzmannDistribution, deprecated there, calls it with the same arguments
    from ase.md.velocitydistribution import thermalize_momenta
except ImportError:  # older ASE
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    def thermalize_momenta(atoms, temperature_K, rng=None):
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)


from siesta_dmguess import DMGuessSiesta
from siesta_dmguess.fdf import read_monkhorst_pack, resolve_fdf
from siesta_dmguess.siesta import find_siesta
from siesta_dmguess.siesta.runner import fdf_value
from siesta_dmguess.structure import read_structure


def calculator_for(fdf: Path, model: str, guess: str, directory: Path) -> DMGuessSiesta:
    """An ASE calculator with the fdf's SIESTA settings."""
    settings = {k: fdf_value(fdf, k) for k in ("PAO.BasisSize", "XC.authors", "MeshCutoff", "DM.Tolerance",
                                               "SCF.Mixer.Weight", "SCF.Mixer.History", "MaxSCFIterations")}
    mesh = float(settings["MeshCutoff"].split()[0]) * units.Ry
    grid = read_monkhorst_pack(fdf)  # diagonal grids, as ASE writes them
    kpts = grid[0] if grid else None
    pseudo_dir = fdf.parent.parent / "basis" if (fdf.parent.parent / "basis").is_dir() else fdf.parent
    return DMGuessSiesta(
        model=model, guess=guess, label="siesta", directory=str(directory), xc=settings["XC.authors"] or "CA",
        basis_set=settings["PAO.BasisSize"] or "DZP", mesh_cutoff=mesh, energy_shift=0.02 * units.Ry,
        pseudo_qualifier="", pseudo_path=str(pseudo_dir), kpts=kpts,
        command=" ".join(find_siesta()) + " < PREFIX.fdf > PREFIX.out",
        fdf_arguments={k: settings[k] for k in ("DM.Tolerance", "SCF.Mixer.Weight", "SCF.Mixer.History",
                                                "MaxSCFIterations") if settings[k]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fdf", type=Path, help="starting structure and SIESTA settings")
    p.add_argument("--model", default="auto", help="model of the ML guesses (default auto: the shipped model that "
                   "covers the structure, as the calculator chooses it)")
    p.add_argument("--guess", default="ml+residual")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dt", type=float, default=0.5, help="time step in fs")
    p.add_argument("--temperature", type=float, default=300.0, help="initial Maxwell-Boltzmann temperature (K)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--relax", type=float, metavar="FMAX",
                   help="run a BFGS relaxation to max force FMAX (eV/Å) instead of MD")
    p.add_argument("--rattle", type=float, default=0.0, help="random displacement (Å, std) of the start")
    p.add_argument("--out", type=Path, default=Path("md.traj"), help="the trajectory to write (not an existing "
                   "file: ASE would empty it before the first SIESTA run)")
    p.add_argument("--workdir", type=Path, default=Path("md_run"))
    args = p.parse_args()
    if args.out.exists():
        p.error(f"{args.out} exists already: give another --out (e.g. relax.traj for a relaxation), or remove it")
    args.fdf = resolve_fdf(args.fdf)  # a run folder stands for its fdf

    atoms = read_structure(args.fdf).atoms
    if args.rattle:
        atoms.rattle(stdev=args.rattle, seed=args.seed)
    atoms.calc = calculator_for(args.fdf, args.model, args.guess, args.workdir)
    args.out.parent.mkdir(parents=True, exist_ok=True)  # ASE's Trajectory does not make the folder
    traj = Trajectory(str(args.out), "w", atoms)
    if args.relax:
        from ase.optimize import BFGS

        dyn = BFGS(atoms)
    else:
        thermalize_momenta(atoms, args.temperature, rng=np.random.default_rng(args.seed))
        Stationary(atoms)
        dyn = VelocityVerlet(atoms, args.dt * units.fs)
    dyn.attach(traj.write, interval=1)

    def report():
        r = atoms.calc.guess_record
        print(f"step {dyn.nsteps:3d}  E_pot {atoms.get_potential_energy():.6f} eV  guess {r.guess:<12} "
              f"SCF iterations {r.scf_iterations}", flush=True)

    dyn.attach(report, interval=1)
    if args.relax:
        dyn.run(fmax=args.relax, steps=args.steps)
    else:
        dyn.run(args.steps)
    iters = [r.scf_iterations for r in atoms.calc.history]
    print(f"{len(iters)} SIESTA runs, {sum(iters)} SCF iterations ({np.mean(iters):.1f} per step) with guess "
          f"{args.guess!r}; trajectory in {args.out}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
