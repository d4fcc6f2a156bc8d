"""The same run written in the other ways SIESTA accepts: is the ML guess still read, and as good?

    SIESTA_COMMAND=/path/to/siesta python integration/benchmarks/fdf_variants.py RUN --model MODEL --out DIR

RUN is a run folder of `../shared/datasets` (its `input.fdf`; pseudopotentials in `../basis`). Each variant
rewrites the fdf without changing the physics (species order and labels, coordinate and lattice units,
atoms shifted by a lattice vector or wrapped across the cell's corner, keys spelled otherwise, the coordinates
in an included file), predicts its DM with `predict_to_file`, and runs SIESTA from it. Every variant should give
the original's SCF count and energy, except `corner`, whose atoms moved relative to SIESTA's real-space mesh
(which changes the converged energy by up to a few meV): it is also run from SIESTA's atomic guess. Two variants are other runs, also run from SIESTA's atomic guess: `no-lattice` (a
molecule in SIESTA's automatic cell, a smaller box than the original's) and `kgrid-cutoff` (k-points by a
cutoff instead of the Monkhorst-Pack block). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np

BOHR = 0.529177210903  # Å


def _block(text: str, name: str) -> re.Match:
    return re.search(rf"%block {name}\s*\n(.*?)%endblock {name}", text, re.S | re.I)


def variants(text: str, molecule: bool) -> dict[str, tuple[str, str, str | None]]:
    """name -> (what it changes, fdf text, text of an included coordinates file or None). ``molecule``: the run
    is a molecule in a box, which SIESTA can also run without a lattice."""
    cell_block, coord_block = _block(text, "LatticeVectors"), _block(text, "AtomicCoordinatesAndAtomicSpecies")
    species_block = _block(text, "ChemicalSpeciesLabel")
    if "LatticeConstant 1.0 Ang" not in text or "AtomicCoordinatesFormat Ang" not in text:
        raise SystemExit("expects an fdf as the shared datasets write them (LatticeConstant 1.0 Ang, Å coordinates)")
    cell = np.array([[float(x) for x in line.split()[:3]] for line in cell_block.group(1).strip().splitlines()])
    rows = [line.split() for line in coord_block.group(1).strip().splitlines()]
    xyz = np.array([[float(x) for x in r[:3]] for r in rows])
    species = [int(r[3]) for r in rows]
    spec_rows = [line.split() for line in species_block.group(1).strip().splitlines()]

    def with_coords(positions, kinds=species, fdf=text) -> str:
        body = "".join(f" {a:.10f} {b:.10f} {c:.10f} {k}\n" for (a, b, c), k in zip(positions, kinds))
        return fdf.replace(coord_block.group(1), body)

    def with_species(new_rows, fdf=text) -> str:
        return fdf.replace(species_block.group(1), "".join(" " + " ".join(r) + "\n" for r in new_rows))

    out = {"original": ("the dataset's fdf", text, None)}
    n = len(spec_rows)
    reverse = {k: n + 1 - k for k in range(1, n + 1)}
    out["species-reversed"] = ("ChemicalSpeciesLabel in reverse order", with_coords(
        xyz, [reverse[k] for k in species], with_species([[str(reverse[int(r[0])]), r[1], r[2]] for r in spec_rows])),
        None)
    out["labels-renamed"] = ("species labels Ow, Hw, ... (pseudopotentials named alike)",
                             with_species([[r[0], r[1], r[2] + "w"] for r in spec_rows]), None)
    out["bohr"] = ("coordinates in Bohr", with_coords(xyz / BOHR).replace(
        "AtomicCoordinatesFormat Ang", "AtomicCoordinatesFormat Bohr"), None)
    out["fractional"] = ("fractional coordinates", with_coords(xyz @ np.linalg.inv(cell)).replace(
        "AtomicCoordinatesFormat Ang", "AtomicCoordinatesFormat Fractional"), None)
    a = float(np.linalg.norm(cell[0]))
    out["lattice-constant"] = ("LatticeConstant in Bohr, vectors in its units", text.replace(
        "LatticeConstant 1.0 Ang", f"LatticeConstant {a / BOHR:.10f} Bohr").replace(
        cell_block.group(1), "".join(" " + " ".join(f"{x / a:.12f}" for x in r) + "\n" for r in cell)), None)
    out["lattice-shift"] = ("atoms moved by a1 - a3", with_coords(xyz + cell[0] - cell[2]), None)
    out["corner"] = ("centred on the cell's corner, wrapped into it", with_coords(
        (xyz - xyz.mean(0)) @ np.linalg.inv(cell) % 1.0 @ cell), None)
    out["spelling"] = ("SystemLabel, key spelling, XC.authors PZ, PAO.EnergyShift 0.2721 eV", text.replace(
        "SystemLabel siesta", "SystemLabel my_run").replace("XC.functional LDA", "xc-functional lda").replace(
        "XC.authors CA", "XC.Authors PZ").replace("PAO.BasisSize DZP", "PAO.BasisSize DZP\nPAO.EnergyShift 0.2721 eV"),
        None)
    out["include"] = ("coordinates read from a file (%block ... < coords.fdf)", text.replace(
        coord_block.group(0), "%block AtomicCoordinatesAndAtomicSpecies < coords.fdf"), coord_block.group(1))
    out["include-block"] = ("the same, the file holding the %block lines too", out["include"][1],
                            coord_block.group(0))
    out["%include"] = ("the coordinates block in a file read with %include coords.fdf", text.replace(
        coord_block.group(0), "%include coords.fdf"), coord_block.group(0))
    if "kgrid" in text.lower():
        out["kgrid-cutoff"] = ("another run: kgrid.Cutoff 10 Ang instead of the Monkhorst-Pack block", re.sub(
            r"%block kgrid_Monkhorst_Pack.*?%endblock kgrid_Monkhorst_Pack", "kgrid.Cutoff 10.0 Ang", text,
            flags=re.S | re.I), None)
    if molecule:
        out["no-lattice"] = ("another run: no lattice, SIESTA's automatic cell", text.replace(
            cell_block.group(0), "").replace("LatticeConstant 1.0 Ang\n", ""), None)
    return out


def run_variant(name: str, fdf_text: str, include: str | None, run: Path, out: Path, model, command,
                baseline: bool) -> dict:
    """Predict the variant's DM and run SIESTA from it (and, with ``baseline``, from its atomic guess)."""
    from siesta_dmguess.errors import DMGuessError, SiestaError
    from siesta_dmguess.fdf import species_block
    from siesta_dmguess.predict import predict_to_file
    from siesta_dmguess.siesta import prepare_run, run_siesta

    src = out / name
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    (src / "input.fdf").write_text(fdf_text)
    if include is not None:
        (src / "coords.fdf").write_text(include)
    for _, _, label in species_block(fdf_text):  # renamed labels: the pseudopotential of their element
        element = label[:-1] if label.endswith("w") else label
        shutil.copy(run.parent / "basis" / f"{element}.psf", src / f"{label}.psf")
    row = {"variant": name}
    try:
        predict_to_file(src / "input.fdf", src / "predicted.DM", model=model, overwrite=True)
        row["predicted"] = "yes"
    except DMGuessError as exc:
        row["predicted"] = f"no: {exc}"
        return row
    for init in ("ml", "atomic") if baseline else ("ml",):
        fdf = prepare_run(src / "input.fdf", src / init, init, dm_file=src / "predicted.DM")
        if include is not None:
            shutil.copy(src / "coords.fdf", src / init / "coords.fdf")
        try:
            result = run_siesta(fdf, command=command, allow_unconverged=True).output
        except SiestaError as exc:
            row["predicted"] += f"; SIESTA failed from the {init} guess ({str(exc).splitlines()[0]})"
            return row
        if init == "atomic":
            row["atomic"], row["atomic_energy"] = result.scf_iterations, result.total_energy_eV
        else:
            row.update(read=result.dm_read_from_file, scf=result.scf_iterations, energy=result.total_energy_eV,
                       converged=result.converged)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a run folder of ../shared/datasets")
    p.add_argument("--model", default="water")
    p.add_argument("--out", type=Path, default=Path("fdf_variants"))
    p.add_argument("--command", default=None, help="SIESTA command (default: SIESTA_COMMAND, ASE's, PATH)")
    p.add_argument("--only", default=None, help="comma-separated variants to run (the original always runs)")
    args = p.parse_args()
    only = None if args.only is None else {"original", *args.only.split(",")}
    from siesta_dmguess.card import load_model

    model = load_model(args.model)
    out = args.out / args.run.resolve().parent.name / args.run.name
    rows = []
    record = json.loads((args.run / "run.json").read_text())
    for name, (what, text, include) in variants((args.run / "input.fdf").read_text(),
                                                molecule=not record["periodic"]).items():
        if only is not None and name not in only:
            continue
        row = run_variant(name, text, include, args.run, out, model, args.command,
                          baseline=what.startswith("another run") or name == "corner")
        rows.append({"what": what, **row})
    base = rows[0]
    print(f"## {args.run} with {args.model}\n")
    print("| variant | what | DM predicted | read by SIESTA | SCF iterations (ML guess) | ΔE vs original (eV) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "scf" not in r:
            print(f"| {r['variant']} | {r['what']} | {r['predicted']} | | | |")
            continue
        scf = f"{r['scf']}" + ("" if r["converged"] else " (not converged)") + (
            f" (atomic guess: {r['atomic']}, ΔE {r['energy'] - r['atomic_energy']:+.1e} eV)" if "atomic" in r else "")
        print(f"| {r['variant']} | {r['what']} | {r['predicted']} | {'yes' if r['read'] else 'no'} | {scf} | "
              f"{r['energy'] - base['energy']:+.1e} |")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
