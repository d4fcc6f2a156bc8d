"""How close must a starting DM be? SCF iterations of D* + t (D_ml - D*) for a range of t.

D* is the run's converged DM, D_ml the model's (refined) prediction; every starting
DM is charge-normalized with S from the basis. Prints the largest
error of each starting DM, SIESTA's iteration count and its dDmax history:

    SIESTA_COMMAND=/path/to/siesta python integration/benchmarks/error_vs_iterations.py \\
        ../shared/datasets/h2o/0004 --model water

Γ-only, molecular and k-point runs alike (``../shared/datasets/si8/0004 --model silicon``): the DMs are
combined image by image (``dm.to_image_keyed``), since the model's supercell and SIESTA's may differ.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    from siesta_dmguess.card import load_model
    from siesta_dmguess.data import find_fdf, load_run
    from siesta_dmguess.dm import from_image_keyed, to_image_keyed, write_density_matrix
    from siesta_dmguess.predict import predict_density_matrix
    from siesta_dmguess.siesta import prepare_run, run_siesta

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a converged run folder (fdf + .DM)")
    p.add_argument("--model", default="water")
    p.add_argument("--scales", default="1,0.1,0.03,0.01,0.003,0.001")
    args = p.parse_args()

    structure, basis, dm_ref, _ = load_run(args.run)
    loaded = load_model(args.model)
    pred = predict_density_matrix(find_fdf(args.run), loaded)
    if pred.overlap is None:
        raise SystemExit("the model carries no radial functions: no overlap for the charge normalization")
    s = pred.keyed_overlap
    exact = to_image_keyed(dm_ref)
    error = to_image_keyed(pred.density_matrix) - exact
    n = pred.electrons_expected
    print(f"{args.run}: model max |error| {abs(error).max():.1e}; block vectors {len(pred.sample.layout.block_vectors(structure))}")
    print(f"{'t':>7} {'max |error|':>12} {'SCF it.':>8}  dDmax per iteration")
    with tempfile.TemporaryDirectory() as tmp:
        for t in [float(x) for x in args.scales.split(",")]:
            start = exact + t * error
            start = start * (n / start.multiply(s).sum())
            work = Path(tmp) / f"t{t}"
            work.mkdir()
            dm_file = work / "start.DM"
            write_density_matrix(from_image_keyed(start, dm_ref.geometry), dm_file)
            fdf = prepare_run(find_fdf(args.run), work / "run", "ml", dm_file=dm_file,
                              pseudo_dirs=[args.run.parent / "basis"])
            out = run_siesta(fdf).output
            history = " ".join(f"{st.dDmax:.1e}" for st in out.scf_history)
            print(f"{t:>7g} {abs(start - exact).max():>12.1e} {out.scf_iterations:>8d}  {history}", flush=True)


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
