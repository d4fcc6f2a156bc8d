"""The SCF-speedup benchmark: SIESTA from its atomic guess vs from the ML guess, same settings otherwise.

For each structure two run folders are prepared from the structure's own fdf,
differing only by the DM-initialisation block (``integration/templates``), and
the user's SIESTA runs both. Reported per structure and in total: SCF
iterations, wall time (prediction + SIESTA), iterations saved, and the
difference of the converged total energies (a guess must never change the answer).
Results go to ``bench.json``, ``bench.md`` and ``bench.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InputFileError


@dataclass
class GuessResult:
    guess: str
    scf_iterations: int
    converged: bool
    dm_read: bool
    total_energy_eV: float | None
    siesta_wall_s: float
    prediction_s: float = 0.0
    dDmax: list = field(default_factory=list)
    start_electron_error: float | None = None  # Tr[D S] - N of the starting DM, as SIESTA printed it


@dataclass
class StructureResult:
    name: str
    natoms: int
    results: dict  # guess -> GuessResult

    def saved(self, guess: str = "ml", base: str = "atomic") -> int:
        return self.results[base].scf_iterations - self.results[guess].scf_iterations


def bench_structure(fdf: Path, workdir: Path, model, guesses=("atomic", "ml"), command=None) -> StructureResult:
    """Run SIESTA on one fdf with each guess; the ML guess is predicted from the fdf."""
    from .predict import predict_to_file
    from .siesta import prepare_run, run_siesta

    results = {}
    natoms = 0
    for guess in guesses:
        run_dir = workdir / guess
        prediction_s, dm_file = 0.0, None
        if guess == "ml":
            t0 = time.perf_counter()
            pred = predict_to_file(fdf, run_dir.parent / "predicted.DM", model=model, overwrite=True)
            prediction_s = time.perf_counter() - t0
            dm_file = run_dir.parent / "predicted.DM"
            natoms = len(pred.structure.atoms)
        new_fdf = prepare_run(fdf, run_dir, guess, dm_file=dm_file, pseudo_dirs=[fdf.parent.parent / "basis"])
        run = run_siesta(new_fdf, command=command)
        out = run.output
        results[guess] = GuessResult(guess, out.scf_iterations, out.converged, out.dm_read_from_file,
                                     out.total_energy_eV, run.wall_s, prediction_s,
                                     [s.dDmax for s in out.scf_history],
                                     None if out.start_dm_electrons is None else out.start_dm_electrons - out.electrons)
    return StructureResult(fdf.parent.name, natoms, results)


def run_benchmark(data_dir, model="water", out_dir="bench", split: str | None = "val", limit: int = 0,
                  command=None, progress: bool = True) -> dict:
    """Benchmark the ML guess against the atomic guess on a dataset folder's structures (default: val split)."""
    from tqdm.auto import tqdm

    from .card import load_model
    from .data import find_fdf, list_runs

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [r for r in list_runs(data_dir) if split is None or r.split == split]
    if limit:
        records = records[:limit]
    if not records:
        raise InputFileError(f"no structures in split {split!r}", data_dir)
    loaded = load_model(model)
    rows = []
    for rec in tqdm(records, desc=f"bench {data_dir.name}", disable=not progress):
        rows.append(bench_structure(find_fdf(rec.folder), out_dir / data_dir.name / rec.id, loaded, command=command))
    report = summarize(rows, str(loaded.path), str(data_dir))
    (out_dir / f"bench_{data_dir.name}.json").write_text(json.dumps(report, indent=1))
    (out_dir / f"bench_{data_dir.name}.md").write_text(markdown(report))
    plot(rows, out_dir / f"bench_{data_dir.name}.png", title=f"{data_dir.name}: {Path(loaded.path).name}")
    return report


def summarize(rows: list[StructureResult], model: str, data: str) -> dict:
    it_a = sum(r.results["atomic"].scf_iterations for r in rows)
    it_m = sum(r.results["ml"].scf_iterations for r in rows)
    wall_a = sum(r.results["atomic"].siesta_wall_s for r in rows)
    wall_m = sum(r.results["ml"].siesta_wall_s + r.results["ml"].prediction_s for r in rows)
    de = [abs(r.results["ml"].total_energy_eV - r.results["atomic"].total_energy_eV) for r in rows]
    return {
        "model": model, "data": data, "structures": len(rows),
        "scf_iterations_atomic": it_a, "scf_iterations_ml": it_m,
        "iterations_saved_fraction": 1 - it_m / it_a if it_a else 0.0,
        "ml_never_worse": all(r.saved() >= 0 for r in rows),
        "all_dm_read": all(r.results["ml"].dm_read for r in rows),
        "all_converged": all(g.converged for r in rows for g in r.results.values()),
        "wall_s_atomic": wall_a, "wall_s_ml_including_prediction": wall_m,
        "max_abs_energy_difference_eV": max(de) if de else 0.0,
        "per_structure": [{"name": r.name, "natoms": r.natoms, **{g: asdict(v) for g, v in r.results.items()}}
                          for r in rows],
    }


def markdown(report: dict) -> str:
    lines = [f"# SCF benchmark: {Path(report['data']).name} with {Path(report['model']).name}", "",
             "| structure | atoms | SCF it. atomic | SCF it. ML | saved | wall atomic (s) | wall ML incl. prediction (s) "
             "| abs(ΔE) (eV) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["per_structure"]:
        a, m = r["atomic"], r["ml"]
        lines.append(f"| {r['name']} | {r['natoms']} | {a['scf_iterations']} | {m['scf_iterations']} | "
                     f"{a['scf_iterations'] - m['scf_iterations']} | {a['siesta_wall_s']:.2f} | "
                     f"{m['siesta_wall_s'] + m['prediction_s']:.2f} | "
                     f"{abs(m['total_energy_eV'] - a['total_energy_eV']):.1e} |")
    lines += ["", f"Total: {report['scf_iterations_atomic']} → {report['scf_iterations_ml']} SCF iterations "
              f"({100 * report['iterations_saved_fraction']:.0f}% saved); wall {report['wall_s_atomic']:.1f} s → "
              f"{report['wall_s_ml_including_prediction']:.1f} s; max |ΔE| "
              f"{report['max_abs_energy_difference_eV']:.1e} eV; ML never worse: {report['ml_never_worse']}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[StructureResult], path: Path, title: str = "") -> None:
    """Left: SCF iterations per structure for each guess. Right: dDmax vs iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(rows))
    for k, guess in enumerate(("atomic", "ml")):
        ax1.bar(x + (k - 0.5) * 0.4, [r.results[guess].scf_iterations for r in rows], 0.4, label=guess)
        for r in rows:
            d = r.results[guess].dDmax
            ax2.semilogy(range(1, len(d) + 1), d, color=f"C{k}", alpha=0.5, label=guess if r is rows[0] else None)
    ax1.set_xticks(x, [r.name for r in rows], rotation=90, fontsize=7)
    ax1.set_ylabel("SCF iterations")
    ax1.legend()
    ax2.axhline(1e-5, color="k", ls=":", lw=1, label="DM.Tolerance")
    ax2.set_xlabel("SCF iteration")
    ax2.set_ylabel("dDmax")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="SCF iterations with the ML guess vs SIESTA's atomic guess (real SIESTA)")
    b.add_argument("data_dir", help="dataset folder of run folders (fdf + basis/*.psf)")
    b.add_argument("--model", default="water")
    b.add_argument("--out", default="bench", help="output folder for runs, JSON, Markdown and PNG")
    b.add_argument("--split", default="val", help="val, train or all")
    b.add_argument("--limit", type=int, default=0, help="at most N structures")
    b.add_argument("--siesta", help="SIESTA command (default: SIESTA_COMMAND, ASE config, PATH)")
    b.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    report = run_benchmark(args.data_dir, args.model, args.out, None if args.split == "all" else args.split,
                           args.limit, args.siesta)
    print(markdown(report))
    return 0
