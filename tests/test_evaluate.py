"""Accuracy metrics on a real SIESTA run: the density-operator error sqrt(Tr[(ΔD S)²]) (float64)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from .conftest import dataset


@pytest.fixture(scope="module")
def h2o_sample():
    from siesta_dmguess.data import load_samples, run_basis

    path = dataset("h2o")
    basis = run_basis(path / "0000", {"H", "O"})
    samples = load_samples([path], ["H", "O"], basis, 4.0, split="val", with_overlap=True)
    return samples[0]


def dense_on_stored(sample, values):
    """A (no, no) matrix holding ``values`` (on the reference's stored elements) at their positions."""
    rows, cols = sample.stored_cell_positions()
    out = np.zeros((sample.layout.no, sample.layout.no))
    out[rows[rows >= 0], cols[rows >= 0]] = values[rows >= 0]
    return out


def on_stored(sample, matrix):
    rows, cols = sample.stored_cell_positions()
    out = np.zeros(sample.target_values.size)
    out[rows >= 0] = matrix[rows[rows >= 0], cols[rows >= 0]]
    return out


def test_density_operator_error_is_the_dense_trace_and_weighs_errors_by_what_they_change(h2o_sample):
    from siesta_dmguess.evaluate import density_operator_error

    s = dense_on_stored(h2o_sample, h2o_sample.meta["overlap"])
    assert np.allclose(s, s.T) and s.shape[0] == h2o_sample.layout.no
    rng = np.random.default_rng(0)
    a = rng.normal(size=s.shape)
    e = 1e-3 * (a + a.T)
    got = density_operator_error(h2o_sample, on_stored(h2o_sample, e))
    assert got == pytest.approx(np.sqrt(np.trace(e @ s @ e @ s)), rel=1e-10)
    assert density_operator_error(h2o_sample, np.zeros(h2o_sample.target_values.size)) == 0.0
    # An error along S's most nearly null direction barely changes ρ: it counts with S's eigenvalue,
    # while the same-sized error along the largest eigenvector counts with that one.
    lam, vec = np.linalg.eigh(s)
    low = density_operator_error(h2o_sample, on_stored(h2o_sample, np.outer(vec[:, 0], vec[:, 0])))
    high = density_operator_error(h2o_sample, on_stored(h2o_sample, np.outer(vec[:, -1], vec[:, -1])))
    assert low == pytest.approx(lam[0], rel=1e-8)
    assert high == pytest.approx(lam[-1], rel=1e-8)
    assert lam[0] < 0.05 * lam[-1]


def test_the_reference_dm_has_the_norm_of_a_pure_state(h2o_sample):
    from siesta_dmguess.evaluate import density_operator_error

    ref = h2o_sample.target_values
    n_electrons = float(ref @ h2o_sample.meta["overlap"])
    # ΔD = -D_ref: sqrt(Tr[(D S)²]) = sqrt(2 N) for an idempotent DS/2 (8 valence electrons in H2O).
    assert n_electrons == pytest.approx(8.0, abs=1e-3)
    assert density_operator_error(h2o_sample, -ref) == pytest.approx(np.sqrt(2 * n_electrons), rel=1e-3)


@pytest.mark.parametrize("name", ["h2o", "water8", "g2", "si8"])
def test_band_energy_of_the_reference_dm_is_the_one_siesta_prints(name):
    """Tr(D H) over the reference's stored elements, with H from the .HSX in eV and, for the k-point si8 runs,
    every image paired with its own H, is SIESTA's band-structure energy Ebs: the H of the last SCF step against
    the DM it gave, so equal to within the SCF tolerance (Ry vs eV would be off by 13.6x, a wrong image by eV)."""
    from siesta_dmguess.basis import read_basis_folder
    from siesta_dmguess.data import load_samples
    from siesta_dmguess.siesta import parse_output

    path = dataset(name)
    species = {"h2o": ["H", "O"], "water8": ["H", "O"], "g2": ["H", "C", "N", "O"], "si8": ["Si"]}[name]
    basis = read_basis_folder(path / "basis", species)
    sample = load_samples([path], species, basis, 4.0, split="val", with_overlap=True)[0]
    siesta_ebs = parse_output(Path(sample.name) / "siesta.out.gz").band_energy_eV
    assert np.dot(sample.target_values, sample.meta["hamiltonian"]) == pytest.approx(siesta_ebs, abs=0.02)
    assert abs(siesta_ebs) > 50  # eV: tens of eV per molecule or cell


def copy_run(src, dest):
    """A user's run folder (fdf, converged .DM, basis files) without the dataset's index.json."""
    import shutil

    dest.mkdir(parents=True)
    for f in ("input.fdf", "siesta.DM", "siesta.HSX"):
        shutil.copy(src / f, dest / f)
    for f in (src.parent / "basis").glob("*.ion.xml"):
        shutil.copy(f, dest / f.name)
    return dest


def test_a_folder_without_index_or_val_split_is_evaluated_whole_and_an_empty_split_is_a_clear_error(
        tmp_path, capsys, caplog):
    import json

    from siesta_dmguess.cli import main

    path = dataset("h2o")
    records = json.loads((path / "index.json").read_text())
    train_ids = [r["id"] for r in records if r["split"] == "train"][:2]
    for rid in train_ids:
        copy_run(path / rid, tmp_path / "mine" / rid)
    # No index.json: the default split (val) must not drop the user's runs.
    report, png = tmp_path / "eval.json", tmp_path / "eval.png"
    assert main(["evaluate", "water", str(tmp_path / "mine"), "--quiet", "--json", str(report), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "mean over 2 structures" in out and "density-operator error" in out and "band-structure energy" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The plot shows the structures' own numbers: MAE of the atomic guess and the model, and MAE vs novelty.
    from siesta_dmguess.evaluate import plot_evaluation

    result = json.loads(report.read_text())
    left, right = plot_evaluation(result, tmp_path / "again.png").axes
    per = result["structures"]
    # The band-structure energy of the model's DM is far closer to SIESTA's than the atomic guess's.
    assert all(abs(m["band_energy_error_eV"]) < 0.1 * abs(m["atomic_band_energy_error_eV"]) for m in per)
    # Variational: SIESTA's DM fills H's lowest states, so any other idempotent DM with as many electrons (what
    # the projection writes) has a higher band energy Tr(D H); a sign or unit slip would break this.
    assert all(m["refinement"] == "idempotent" and m["band_energy_error_eV"] > -1e-5 for m in per)
    assert result["summary"]["band_energy_abs_error_mean_eV"] < result["summary"]["atomic_band_energy_abs_error_mean_eV"]
    assert np.allclose(left.lines[0].get_ydata(), [m["atomic_mae"] for m in per])
    assert np.allclose(left.lines[1].get_ydata(), [m["mae"] for m in per])
    assert np.allclose(right.lines[0].get_xdata(), [m["novelty"] for m in per])
    assert result["novelty_threshold"] > 0 and right.lines[1].get_xdata()[0] == pytest.approx(result["novelty_threshold"])
    # An index.json with no 'val' run (e.g. new structures marked 'test'): the default takes every run and says so.
    index = [{"id": rid, "split": s} for rid, s in zip(train_ids, ("train", "test"))]
    (tmp_path / "mine" / "index.json").write_text(json.dumps(index))
    assert main(["evaluate", "water", str(tmp_path / "mine"), "--quiet"]) == 0
    assert "mean over 2 structures" in capsys.readouterr().out
    assert "hold no 'val' split; using all 2 runs" in caplog.text
    # Asking for 'val' explicitly names the folder and the fix.
    assert main(["evaluate", "water", str(tmp_path / "mine"), "--quiet", "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "mine" in err and "no runs in split 'val'; the runs record test (1), train (1); --split all" in err
    assert main(["evaluate", "water", str(tmp_path / "mine"), "--quiet", "--split", "test"]) == 0
    assert "mean over 1 structure:" in capsys.readouterr().out


def test_evaluate_table_names_runs_by_dataset_and_run_not_by_a_cut_absolute_path():
    from siesta_dmguess.cli import _display_names

    runs = ["/a/long/place/bench_unseen/water64/0000/atomic", "/a/long/place/bench_unseen/water64/0001/atomic"]
    assert _display_names(runs) == ["water64/0000/atomic", "water64/0001/atomic"]
    assert _display_names(["../shared/datasets/h2o/0004", "../shared/datasets/water8/0004"]) == \
        ["datasets/h2o/0004", "datasets/water8/0004"]
    long = _display_names(["/" + "x" * 60 + "/0001"], width=20)[0]
    assert len(long) == 20 and long.startswith("…") and long.endswith("/0001")


def test_a_run_siesta_did_not_converge_is_refused_as_reference(tmp_path, caplog):
    """SIESTA writes its .DM at every SCF iteration, so a run stopped before convergence leaves a .DM that is no
    reference: the folder's SIESTA output, or the dataset's index.json, saying so is an error naming the run. A run
    with neither is used, with a warning that names it (it was taken as converged without a word)."""
    import gzip
    import json
    import shutil

    from siesta_dmguess.basis import read_basis_folder
    from siesta_dmguess.data import load_samples
    from siesta_dmguess.errors import InputFileError

    src = dataset("h2o") / "0004"
    data = tmp_path / "data"
    run = copy_run(src, data / "0004")
    basis = read_basis_folder(src.parent / "basis", ["H", "O"])
    load = lambda: load_samples([data], ["H", "O"], basis, 3.0)  # noqa: E731
    shutil.copy(src / "siesta.out.gz", run / "siesta.out.gz")  # SIESTA's own output of the run: converged
    with caplog.at_level("WARNING", logger="siesta_dmguess"):
        assert len(load()) == 1
    assert "no SIESTA output" not in caplog.text
    with gzip.open(src / "siesta.out.gz", "rt") as f:
        text = f.read()
    cut = text[:text.index("SCF cycle converged")]  # the same run, killed before its SCF converged
    with gzip.open(run / "siesta.out.gz", "wt") as f:
        f.write(cut)
    with pytest.raises(InputFileError, match=r"0004: siesta.out.gz does not say that SIESTA's SCF converged"):
        load()
    # A relaxation or MD (its SCF cycles one per geometry, the .DM the last one's, the fdf the first structure):
    # trained on and evaluated against without a word, 200-340x the model's real error.
    scf = text[text.index("   scf:    1"):text.index("SCF cycle converged")]
    with gzip.open(run / "siesta.out.gz", "wt") as f:
        f.write(text.replace("SCF cycle converged", scf + "SCF cycle converged", 1))
    with pytest.raises(InputFileError, match=r"0004: siesta.out.gz holds 2 geometry steps \(a relaxation or MD"):
        load()
    (run / "siesta.out.gz").unlink()
    with caplog.at_level("WARNING", logger="siesta_dmguess"):
        assert len(load()) == 1
    assert re.search(r"1 run folder\(s\) hold no SIESTA output .*\(\S*data/0004\): their .DM is taken as converged",
                     caplog.text)
    caplog.clear()
    (data / "index.json").write_text(json.dumps([{"id": "0004", "converged": True}]))
    with caplog.at_level("WARNING", logger="siesta_dmguess"):
        assert len(load()) == 1
    assert "no SIESTA output" not in caplog.text
    (data / "index.json").write_text(json.dumps([{"id": "0004", "converged": False}]))
    with pytest.raises(InputFileError, match=r"0004: the run's record \(index.json or run.json\) says that SIESTA did not converge"):
        load()


@pytest.mark.parametrize("swapped, hsx", [(["siesta.DM"], True), (["siesta.HSX"], True), (["siesta.DM"], False),
                                          (["siesta.DM", "siesta.HSX"], True)])
def test_a_dm_or_hsx_of_another_structure_is_refused_as_reference(tmp_path, swapped, hsx):
    """A .DM (or .HSX) copied from another run of the same molecule fits the orbitals, and was scored against and
    trained on without a word (MAE "1.0x" the atomic guess's; 7.80 of 8 electrons). Tr(D S) gives it away: with S
    from the basis at the fdf's geometry SIESTA's own DM holds N within 4e-5, with its .HSX's S within 3e-7. A .DM
    and .HSX copied together agree with each other (the .HSX alone let them pass): the basis's S catches them."""
    import shutil

    from siesta_dmguess.basis import read_basis_folder
    from siesta_dmguess.data import load_samples
    from siesta_dmguess.errors import InputFileError

    src = dataset("h2o") / "0000"
    run = copy_run(src, tmp_path / "data" / "0000")
    if not hsx:
        (run / "siesta.HSX").unlink()
    basis = read_basis_folder(src.parent / "basis", ["H", "O"])
    load = lambda: load_samples([tmp_path / "data"], ["H", "O"], basis, 3.0, with_overlap=True)  # noqa: E731
    assert len(load()) == 1
    for name in swapped:
        shutil.copy(src.parent / "0005" / name, run / name)
    only_hsx = swapped == ["siesta.HSX"]
    where = "the siesta.HSX's overlap" if only_hsx else "S computed from the basis"
    files = "the siesta.HSX" if only_hsx else "the .DM"  # the basis's S, checked first, cleared the .DM
    with pytest.raises(InputFileError, match=rf"0000: the .DM with {where} holds Tr\(D S\) = \d\.\d{{4}} "
                                             rf"electrons, but the structure has 8: {files} is not of this run"):
        load()


@pytest.mark.parametrize("cut", ["head", "middle", "last byte", "empty", "appended", "after the sizes",
                                 "after H", "before the atoms' species"])
def test_a_truncated_or_corrupt_hsx_is_a_clear_error_not_an_abort(tmp_path, cut):
    """An .HSX cut short made sisl's Fortran reader read a wrong size and abort the process in about 2 runs of 5
    ("Error allocating 28932898880 bytes", exit 1, no file named), which no except catches; its records are now
    walked first, and a file cut between two records is checked against the layout SIESTA writes."""
    from siesta_dmguess.files import fortran_records

    from siesta_dmguess.basis import read_basis_folder
    from siesta_dmguess.data import load_samples
    from siesta_dmguess.errors import InputFileError

    src = dataset("h2o") / "0000"
    run = copy_run(src, tmp_path / "data" / "0000")
    data = (run / "siesta.HSX").read_bytes()
    ends = [offset + length + 4 for offset, length in fortran_records(run / "siesta.HSX", ".HSX")]  # after record k
    no_u = 23  # a water molecule's DZP orbitals: the sizes, gamma, numh, then no_u rows each of listh, H, S
    broken = {"head": data[:5000], "middle": data[:len(data) // 2], "last byte": data[:-1], "empty": b"",
              "appended": data + b"\x07\x00\x00\x00abc", "after the sizes": data[:ends[0]],
              "after H": data[:ends[2 + 2 * no_u]], "before the atoms' species": data[:ends[-3]]}[cut]
    (run / "siesta.HSX").write_bytes(broken)
    basis = read_basis_folder(src.parent / "basis", ["H", "O"])
    with pytest.raises(InputFileError, match=r"siesta.HSX: the .HSX file is (truncated or corrupt|empty)"):
        load_samples([tmp_path / "data"], ["H", "O"], basis, 3.0, with_overlap=True)


def test_a_dm_that_predict_wrote_into_a_run_folder_is_refused_as_reference(tmp_path, capsys):
    """``predict RUN/`` keeps SIESTA's DM as siesta.DM.bak and writes its own; evaluate on the folder used to
    measure the model against its own prediction (MAE 6e-9). Rerunning SIESTA from it makes it a reference again."""
    import os
    import shutil

    from siesta_dmguess.basis import read_basis_folder
    from siesta_dmguess.cli import main
    from siesta_dmguess.data import load_samples
    from siesta_dmguess.errors import InputFileError

    src = dataset("h2o") / "0004"
    data = tmp_path / "data"
    run = copy_run(src, data / "0004")
    shutil.copy(src / "siesta.out.gz", run / "siesta.out.gz")
    basis = read_basis_folder(src.parent / "basis", ["H", "O"])
    load = lambda: load_samples([data], ["H", "O"], basis, 3.0)  # noqa: E731
    assert main(["predict", str(run), "--model", "water", "--threads", "1"]) == 0
    assert (run / "siesta.DM.bak").is_file()
    with pytest.raises(InputFileError, match=r"siesta.DM: this .DM is newer .*\(mv siesta.DM.bak siesta.DM\)"):
        load()
    assert main(["evaluate", "water", str(data), "--quiet"]) == 2
    assert "looks written by `siesta-dmguess predict`" in capsys.readouterr().err
    later = (run / "siesta.DM").stat().st_mtime + 5  # SIESTA run again in the folder: its output is the newest file
    os.utime(run / "siesta.out.gz", (later, later))
    assert len(load()) == 1


def test_the_refusal_names_the_backup_siestas_run_wrote_not_the_first(tmp_path):
    """A probe predicted twice into a fresh folder, ran SIESTA, and predicted again: siesta.DM.bak then held the first
    prediction and .bak1 SIESTA's DM, but the message said `mv siesta.DM.bak siesta.DM`; done so, evaluate took that
    prediction as the reference (MAE 4e-9)."""
    import os
    import shutil

    from siesta_dmguess.data import check_dm_is_siestas
    from siesta_dmguess.errors import InputFileError

    src = dataset("h2o") / "0004"
    run = tmp_path / "run"
    run.mkdir()
    out = run / "siesta.out.gz"
    shutil.copy(src / "siesta.out.gz", out)
    end = out.stat().st_mtime
    files = {"siesta.DM.bak": end - 3600,  # the first prediction, before SIESTA ran
             "siesta.DM.bak1": end - 1,  # SIESTA's own, written at its last SCF iteration
             "siesta.DM": end + 60}  # the prediction written after the run
    for name, when in files.items():
        shutil.copy(src / "siesta.DM", run / name)
        os.utime(run / name, (when, when))
    with pytest.raises(InputFileError, match=r"newer than .*\(mv siesta.DM.bak1 siesta.DM\)"):
        check_dm_is_siestas(run / "siesta.DM")
    os.replace(run / "siesta.DM.bak1", run / "siesta.DM")  # SIESTA's DM put back: a reference
    check_dm_is_siestas(run / "siesta.DM")
    later = end + 120  # the output compressed again a day later: SIESTA's DM is still older, still a reference
    os.utime(out, (later, later))
    check_dm_is_siestas(run / "siesta.DM")
    os.utime(run / "siesta.DM.bak", (later + 60, later + 60))
    os.utime(run / "siesta.DM", (later + 60, later + 60))  # no backup before the output: nothing to put back
    with pytest.raises(InputFileError, match=r"No backup \(siesta.DM.bak\) is older than the folder's SIESTA"):
        check_dm_is_siestas(run / "siesta.DM")
    out.unlink()
    with pytest.raises(InputFileError, match=r"the folder holds no SIESTA output .*Rerun SIESTA"):
        check_dm_is_siestas(run / "siesta.DM")


def test_a_run_copied_without_its_file_times_is_said_to_be_ambiguous(tmp_path, caplog):
    """`cp -r` of a folder where predict had written its DM (SIESTA's kept as .bak) gives every file the copy's
    time: the prediction then passed as SIESTA's reference without a word."""
    import os
    import shutil

    from siesta_dmguess.data import check_dm_is_siestas

    src = dataset("h2o") / "0004"
    run = tmp_path / "run"
    run.mkdir()
    for name in ("siesta.out.gz", "siesta.DM", "siesta.DM.bak"):
        shutil.copy(src / (name if name != "siesta.DM.bak" else "siesta.DM"), run / name)
        os.utime(run / name, (1e9, 1e9))
    with caplog.at_level("WARNING"):
        check_dm_is_siestas(run / "siesta.DM")
    assert "cannot be told whether it is SIESTA's DM" in caplog.text and "siesta.DM.bak" in caplog.text
    os.utime(run / "siesta.DM.bak", (1e9 - 600, 1e9 - 600))  # a backup made well before SIESTA ran: no doubt
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_dm_is_siestas(run / "siesta.DM")
    assert "cannot be told" not in caplog.text


def test_copied_runs_keep_the_split_their_run_json_records_and_a_split_nobody_records_is_said(tmp_path, caplog):
    """Without index.json the runs' own run.json gives their split (``--split train`` took val runs before);
    where no run records one, a named split takes every run, with a warning instead of silently."""
    import json

    from siesta_dmguess.data import resolve_split, select_runs
    from siesta_dmguess.errors import InputFileError

    for run_id, split in (("0001", "train"), ("0004", "val"), ("0007", None)):
        (tmp_path / "copied" / run_id).mkdir(parents=True)
        (tmp_path / "copied" / run_id / "input.fdf").write_text("SystemLabel siesta\n")
        if split:
            (tmp_path / "copied" / run_id / "run.json").write_text(json.dumps({"id": run_id, "split": split}))
    copied = tmp_path / "copied"
    assert [r.id for r in select_runs([copied], "train")] == ["0001", "0007"]  # 0007 records none: every split
    assert resolve_split(copied, "auto") == "val"
    assert [r.id for r in select_runs([copied], resolve_split(copied, "auto"))] == ["0004", "0007"]
    (tmp_path / "own" / "a").mkdir(parents=True)
    (tmp_path / "own" / "a" / "input.fdf").write_text("SystemLabel siesta\n")
    with caplog.at_level("WARNING"):
        assert resolve_split(tmp_path / "own", "bogus") == "bogus"
    assert "record no split" in caplog.text and "--split bogus takes all 1 runs" in caplog.text
    (copied / "0001" / "run.json").write_text("{not json")
    with pytest.raises(InputFileError, match=r"0001/run.json: run.json is not valid JSON"):
        select_runs([copied])


def test_a_run_given_twice_is_read_once(tmp_path, caplog):
    """``train DATA DATA`` (or DATA and DATA/) trained on each run twice, and its random hold-out could validate on a
    structure it also trained on."""
    from siesta_dmguess.data import select_runs

    for run_id in ("0001", "0002"):
        (tmp_path / "data" / run_id).mkdir(parents=True)
        (tmp_path / "data" / run_id / "input.fdf").write_text("SystemLabel siesta\n")
    data = tmp_path / "data"
    with caplog.at_level("WARNING"):
        runs = select_runs([data, Path(f"{data}/"), tmp_path / "data" / ".." / "data"])
    assert [r.id for r in runs] == ["0001", "0002"]
    assert "0001: given more than once; taken once" in caplog.text


def test_evaluate_counts_a_folder_given_twice_once(capsys):
    from siesta_dmguess.cli import main

    h2o = dataset("h2o")
    assert main(["evaluate", "water", str(h2o), f"{h2o}/", "--quiet"]) == 0
    assert "mean over 12 structures" in capsys.readouterr().out


@pytest.mark.parametrize("index, problem", [
    ({"runs": []}, "must be a list of run records"), ([{"name": "x"}], "must be a list of run records"),
    ([{"id": "0001"}, {"id": "0009"}], "lists run '0009', whose folder")])
def test_a_malformed_index_json_is_named(tmp_path, index, problem):
    """Each was a bare TypeError, KeyError or a missing-fdf error about a folder that does not exist."""
    import json

    from siesta_dmguess.data import select_runs
    from siesta_dmguess.errors import InputFileError

    (tmp_path / "data" / "0001").mkdir(parents=True)
    (tmp_path / "data" / "0001" / "input.fdf").write_text("SystemLabel siesta\n")
    (tmp_path / "data" / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputFileError, match=f"index.json: .*{problem}"):
        select_runs([tmp_path / "data"])


def test_run_folders_an_index_json_does_not_list_are_said_once(tmp_path, caplog):
    """A probe added a run to a copy of a dataset: evaluate, train and bench left it out without a word."""
    import json
    import logging

    from siesta_dmguess.data import list_runs

    for run in ("0001", "0002", "new"):
        (tmp_path / "data" / run).mkdir(parents=True)
        (tmp_path / "data" / run / "input.fdf").write_text("SystemLabel siesta\n")
    (tmp_path / "data" / "basis").mkdir()  # no fdf: not a run
    (tmp_path / "data" / "index.json").write_text(json.dumps([{"id": "0001", "split": "train"},
                                                              {"id": "0002", "split": "val"}]))
    with caplog.at_level(logging.WARNING, logger="siesta_dmguess"):
        assert [r.id for r in list_runs(tmp_path / "data")] == ["0001", "0002"]
        list_runs(tmp_path / "data")
    said = [r.getMessage() for r in caplog.records if "does not list" in r.getMessage()]
    assert len(said) == 1 and "index.json does not list 1 run folder(s) beside it (new)" in said[0], said
    (tmp_path / "data" / "index.json").write_text(json.dumps([{"id": r} for r in ("0001", "0002", "new")]))
    caplog.clear()
    list_runs(tmp_path / "data")
    assert not [r for r in caplog.records if "does not list" in r.getMessage()]


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_an_output_into_a_missing_folder_is_refused_before_evaluating(tmp_path, capsys, option):
    """It was a bare FileNotFoundError after the whole evaluation had run. The folder here holds no runs, so an
    error about the output (not about the runs) shows the check comes first."""
    from siesta_dmguess.cli import main

    assert main(["evaluate", "water", str(tmp_path), option, str(tmp_path / "missing" / "out.x")]) == 2
    err = capsys.readouterr().err
    assert "missing: the output folder does not exist" in err and "no run folders" not in err
    # a folder in the way, and (--plot) a suffix that is no image format: also before, not after the evaluation
    (tmp_path / "adir").mkdir()
    assert main(["evaluate", "water", str(tmp_path), option, str(tmp_path / "adir")]) == 2
    assert "adir: a folder is in the way" in capsys.readouterr().err
    if option == "--plot":
        assert main(["evaluate", "water", str(tmp_path), option, str(tmp_path / "plot.txt")]) == 2
        err = capsys.readouterr().err
        assert "plot.txt: the image's format is given by its suffix" in err and ".png" in err


def test_references_made_with_other_settings_than_the_models_are_refused(tmp_path, capsys):
    """A model scored against references of another functional (or basis setting) would measure the difference
    of the functionals, not the model: evaluate names the run and the setting, as predict does."""
    import shutil

    from siesta_dmguess.cli import main

    src = dataset("h2o")
    data = tmp_path / "data"
    shutil.copytree(src / "basis", data / "basis")
    run = copy_run(src / "0004", data / "0004")
    fdf = run / "input.fdf"
    fdf.write_text(fdf.read_text().replace("XC.functional LDA", "XC.functional GGA"))
    assert main(["evaluate", "water", str(data), "--quiet"]) == 2
    assert "0004: made with other settings than the model's data: fdf setting XC.functional is 'GGA', the model " \
           "was trained with 'LDA'" in capsys.readouterr().err
    fdf.write_text(fdf.read_text().replace("XC.functional GGA", "XC.functional LDA"))
    assert main(["evaluate", "water", str(data), "--quiet"]) == 0


def test_runs_whose_labels_are_not_the_models_species_are_evaluated_as_predict_maps_them(tmp_path):
    """A run labelling oxygen Ow (its Ow.ion.xml says so too) is the model's O, for evaluate as for predict: the
    same errors as the same run labelled O (it was refused as not covered)."""
    from siesta_dmguess.evaluate import evaluate

    src = dataset("h2o") / "0004"
    plain = copy_run(src, tmp_path / "plain" / "0004")
    labelled = copy_run(src, tmp_path / "labelled" / "0004")
    fdf = labelled / "input.fdf"
    fdf.write_text(fdf.read_text().replace(" 8 O\n", " 8 Ow\n"))
    assert " 8 Ow\n" in fdf.read_text()
    ion = (labelled / "O.ion.xml").read_text().replace("<label> O </label>", "<label> Ow </label>")
    (labelled / "Ow.ion.xml").write_text(ion)
    (labelled / "O.ion.xml").unlink()
    a, b = (evaluate("water", [folder], progress=False)["structures"][0] for folder in (plain.parent, labelled.parent))
    assert a["mae"] == b["mae"] and a["max_abs"] == b["max_abs"] and a["mae"] < 1e-3


def test_a_folder_the_model_does_not_cover_is_said_before_any_evaluation(monkeypatch):
    """`evaluate water h2o si8` evaluated h2o, then stopped on si8 with nothing reported."""
    import siesta_dmguess.evaluate as evaluate_module
    from siesta_dmguess.errors import ModelCompatibilityError

    monkeypatch.setattr(evaluate_module, "evaluate_samples", lambda *a, **k: pytest.fail("evaluated first"))
    with pytest.raises(ModelCompatibilityError, match="'Si'"):
        evaluate_module.evaluate("water", [dataset("h2o"), dataset("si8")], split="val", progress=False)


@pytest.mark.parametrize("mode", ["charge", "idempotent"])
def test_evaluate_refines_a_charged_run_to_its_electron_count_as_predict_does(h2o_sample, mode):
    """A run with NetCharge holds N - NetCharge electrons: evaluate's refinement (and train's ΔH head) target that
    count, as predict does, not the neutral one."""
    from dataclasses import replace

    from siesta_dmguess.data import run_basis
    from siesta_dmguess.evaluate import refine_flat
    from siesta_dmguess.overlap import OverlapCalculator, electron_count

    overlap = OverlapCalculator(run_basis(dataset("h2o") / "0000", {"H", "O"}))
    flat = h2o_sample.layout.atomic.astype(float)  # any DM: the isolated atoms'
    s = overlap.flat(h2o_sample.structure, h2o_sample.layout)
    for net, electrons in ((None, 8.0), ("1.0", 7.0), ("-2", 10.0)):
        settings = dict(h2o_sample.structure.fdf_settings)
        settings.pop("NetCharge", None)
        if net is not None:
            settings["NetCharge"] = net
        sample = replace(h2o_sample, structure=replace(h2o_sample.structure, fdf_settings=settings))
        refined, _, _ = refine_flat(sample, flat, overlap, mode)
        assert electron_count(sample.layout, refined, s, sample.fold) == pytest.approx(electrons, abs=1e-8), net


def test_evaluate_says_which_runs_it_scored_and_marks_novel_structures(tmp_path, capsys):
    """A folder of a train and a val run: the default split scores the val run alone, which was not said; a
    novelty above the model's flag level was printed like any other."""
    import json

    from siesta_dmguess.cli import main

    for run_id, split in (("0001", "train"), ("0004", "val")):
        copy_run(dataset("h2o") / run_id, tmp_path / "mixed" / run_id)
        (tmp_path / "mixed" / run_id / "run.json").write_text(json.dumps({"id": run_id, "split": split}))
    assert main(["evaluate", "water", str(tmp_path / "mixed")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'mixed'}: 1 run(s) of split val; 1 other run(s) left out (--split all takes them)" in out
    assert main(["evaluate", "chno-molecules", str(tmp_path / "mixed"), "--split", "all"]) == 0
    out = capsys.readouterr().out
    assert "left out" not in out and "2 run(s)" in out
    rows = [line for line in out.splitlines() if line.startswith(("mixed", "0001", "0004")) or "/0004" in line]
    threshold = float(re.search(r"flag level (\S+):", out).group(1))
    assert len(rows) == 2 and any(line.endswith("*") for line in rows)  # water molecules are new to chno-molecules
    for line in rows:  # each row's novelty carries the mark exactly where it is above the flag level
        value = line.rstrip("*").split()[-1]
        assert line.endswith("*") == (float(value) > threshold), line


def test_a_run_without_a_dm_is_named_with_what_to_do(tmp_path, capsys):
    """No test reached this error, which said "no converged .DM" of a folder with no .DM at all."""
    from siesta_dmguess.cli import main

    run = copy_run(dataset("h2o") / "0004", tmp_path / "set" / "0004")
    (run / "siesta.DM").unlink()
    assert main(["evaluate", "water", str(tmp_path / "set")]) == 2
    err = capsys.readouterr().err
    assert f"{run}: the run folder has no siesta.DM, the .DM its fdf's SystemLabel names" in err
    assert "Traceback" not in err and "another SystemLabel" not in err
    (run / "water.DM").write_bytes(b"")  # a run of the fdf as it was before its SystemLabel changed
    assert main(["evaluate", "water", str(tmp_path / "set")]) == 2
    assert "it holds water.DM, of another SystemLabel: a run of another fdf?" in capsys.readouterr().err


def test_a_run_with_ghost_atoms_is_refused_for_training_and_evaluation(tmp_path):
    """train learned ghost atoms as a species of their own (H_ghost, Z 1, no electrons), which predict then refused
    as "which no model has learned"; evaluate with an ordinary model named a basis difference instead."""
    from siesta_dmguess.basis import read_basis_folder
    from siesta_dmguess.data import load_samples
    from siesta_dmguess.errors import InputFileError

    src = dataset("h2o") / "0004"
    run = copy_run(src, tmp_path / "data" / "0004")
    (run / "H_ghost.ion.xml").write_bytes((run / "H.ion.xml").read_bytes())
    fdf = (run / "input.fdf").read_text()
    fdf = fdf.replace("NumberOfSpecies 2", "NumberOfSpecies 3").replace(
        "%endblock ChemicalSpeciesLabel", " 3 -1 H_ghost\n%endblock ChemicalSpeciesLabel")
    lines = fdf.splitlines()
    last = max(i for i, line in enumerate(lines) if line.strip().endswith(" 2"))  # the last coordinate row (H)
    x, y, z = map(float, lines[last].split()[:3])
    lines.insert(last + 1, f"  {x + 2.0:.6f} {y:.6f} {z:.6f} 3")
    (run / "input.fdf").write_text("\n".join(lines).replace("NumberOfAtoms 3", "NumberOfAtoms 4") + "\n")
    basis = read_basis_folder(src.parent / "basis", ["H", "O"])
    with pytest.raises(InputFileError, match=r"input.fdf: species \['H_ghost'\] are ghost atoms .*leave the run out"):
        load_samples([tmp_path / "data"], ["H", "O"], basis, 3.0)
