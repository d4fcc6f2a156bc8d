"""Finding and running SIESTA, with small fake `siesta` scripts for the failure modes."""

import re
import shutil
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from siesta_dmguess.errors import InputFileError, SiestaError, SiestaNotFoundError
from siesta_dmguess.siesta import apply_dm_init, find_siesta, prepare_run, run_siesta

ROOT = Path(__file__).resolve().parents[1]
FDF = textwrap.dedent("""\
    SystemLabel water
    NumberOfSpecies 2
    %block ChemicalSpeciesLabel
     1 8 O
     2 1 H
    %endblock ChemicalSpeciesLabel
    DM.UseSaveDM F
    """)

GOOD = """\
Siesta Version  : fake-1.0
Attempting to read DM from file... Succeeded...
   scf:    1     -465.9     -464.7     -464.7  0.010000 -4.7  0.2
   scf:    2     -465.6     -465.6     -465.6  0.000008 -2.2  0.0001
SCF cycle converged after 2 iterations
siesta:         Total =    -465.674271
siesta:         Fermi =      -2.241971
timer: Elapsed wall time (sec) =       0.10
Job completed
"""


def fake_siesta(tmp_path, body: str, exit_code: int = 0):
    script = tmp_path / "fake_siesta"
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.stdin.read()\nsys.stdout.write({body!r})\n"
                      f"sys.exit({exit_code})\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def logging_siesta(tmp_path):
    """A fake SIESTA that appends the guess of each run it is given (ml or atomic) to a log: (log, script)."""
    log = tmp_path / "calls.log"
    script = tmp_path / "logging_siesta"
    script.write_text(f"#!{sys.executable}\nimport sys\nfdf = sys.stdin.read()\n"
                      f"open({str(log)!r}, 'a').write('ml\\n' if 'DM.UseSaveDM T' in fdf else 'atomic\\n')\n"
                      f"sys.stdout.write({GOOD!r})\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return log, script


def water_run(folder, fdf=FDF, labels=("O", "H")):
    """A run folder with a water molecule's fdf and fake pseudopotentials."""
    from siesta_dmguess.siesta.templates import fdf_with_geometry

    from .conftest import water_molecule

    folder.mkdir(parents=True)
    for label in labels:
        (folder / f"{label}.psf").write_text("fake")
    molecule = water_molecule()
    symbols = molecule.get_chemical_symbols()
    (folder / "input.fdf").write_text(fdf_with_geometry(fdf, molecule, [labels[0] if s == "O" else s for s in symbols]))
    return folder


def tiny_model(folder, novelty_threshold=1e6):
    """A small untrained model of H and O, saved to ``folder``; the default threshold flags nothing as novel."""
    from siesta_dmguess.card import save_model
    from siesta_dmguess.model import DensityMatrixModel

    from .conftest import small_config

    model = DensityMatrixModel(small_config())
    model.novelty_threshold.fill_(novelty_threshold)
    save_model(model, folder, {"name": "tiny"})
    return folder


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "input.fdf").write_text(FDF)
    (d / "O.psf").write_text("fake")
    (d / "H.psf").write_text("fake")
    return d


def test_find_siesta_order(tmp_path, monkeypatch):
    exe = fake_siesta(tmp_path, GOOD)
    monkeypatch.setenv("SIESTA_COMMAND", str(exe))
    monkeypatch.setenv("ASE_SIESTA_COMMAND", "/nonexistent/siesta < PREFIX.fdf > PREFIX.out")
    assert find_siesta() == [str(exe)]
    monkeypatch.delenv("SIESTA_COMMAND")
    monkeypatch.setenv("ASE_SIESTA_COMMAND", f"{exe} < PREFIX.fdf > PREFIX.out")
    assert find_siesta() == [str(exe)]  # ASE's template reduced to the executable


@pytest.mark.parametrize("template", ["{exe} < input.fdf > siesta.out", "{exe} <input.fdf >siesta.out 2>&1",
                                      "{exe} < PREFIX.fdf >> PREFIX.out"])
def test_a_command_with_redirections_is_reduced_to_the_executable(tmp_path, monkeypatch, template):
    """Redirections name files the runner handles itself; left in, 'input.fdf' and 'siesta.out' reached SIESTA as
    arguments (4.1 opens the first as its input: another run's fdf, or none)."""
    exe = fake_siesta(tmp_path, GOOD)
    monkeypatch.setenv("SIESTA_COMMAND", template.format(exe=exe))
    assert find_siesta() == [str(exe)]
    monkeypatch.setenv("SIESTA_COMMAND", f"env OMP_NUM_THREADS=1 {exe} < input.fdf")
    assert find_siesta()[-1] == str(exe) and find_siesta()[1] == "OMP_NUM_THREADS=1"


def test_a_siesta_command_that_is_set_but_wrong_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    """A mistyped --siesta (or $SIESTA_COMMAND) must not quietly run another SIESTA found further down the list."""
    exe = fake_siesta(tmp_path, GOOD)
    monkeypatch.setenv("SIESTA_COMMAND", str(exe))
    monkeypatch.delenv("ASE_SIESTA_COMMAND", raising=False)
    monkeypatch.setattr("siesta_dmguess.siesta.runner._ase_config_command", lambda: None)
    with pytest.raises(SiestaNotFoundError, match=r"given by argument \('/nonexistent/siesta'\) is not an executable"):
        find_siesta("/nonexistent/siesta")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "siesta").symlink_to(exe)  # a working `siesta` on PATH too
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("SIESTA_COMMAND")
    assert find_siesta() == [str(tmp_path / "bin" / "siesta")]
    monkeypatch.setenv("SIESTA_COMMAND", str(tmp_path / "siesta-typo"))
    with pytest.raises(SiestaNotFoundError, match="given by SIESTA_COMMAND"):
        find_siesta()


def test_missing_siesta_lists_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.delenv("SIESTA_COMMAND", raising=False)
    monkeypatch.delenv("ASE_SIESTA_COMMAND", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("siesta_dmguess.siesta.runner._ase_config_command", lambda: None)
    with pytest.raises(SiestaNotFoundError) as err:
        find_siesta()
    msg = str(err.value)
    assert "SIESTA_COMMAND" in msg and "ASE_SIESTA_COMMAND" in msg and "PATH" in msg
    # Both benchmarks say so first: before reading the data or loading a model (neither exists here).
    from siesta_dmguess.bench import run_benchmark, run_trajectory_benchmark

    for call in (lambda: run_benchmark(tmp_path / "no-data", model=tmp_path / "no-model"),
                 lambda: run_trajectory_benchmark(tmp_path / "no.traj", tmp_path / "no.fdf", tmp_path / "no-model")):
        with pytest.raises(SiestaNotFoundError):
            call()


def test_run_parses_output(run_dir, tmp_path):
    run = run_siesta(run_dir / "input.fdf", command=str(fake_siesta(tmp_path, GOOD)))
    assert run.output.scf_iterations == 2 and run.output.dm_read_from_file and run.output.converged
    assert run.out_file == run_dir / "water.out"


def test_crash_is_a_clear_error(run_dir, tmp_path):
    exe = fake_siesta(tmp_path, "Siesta Version  : fake\n   scf:    1  1 1 1 1 1 1\nSegmentation fault\n", 139)
    with pytest.raises(SiestaError) as err:
        run_siesta(run_dir / "input.fdf", command=str(exe))
    assert "exit status 139" in str(err.value) and "water.out" in str(err.value)
    assert "Segmentation fault" in str(err.value)  # its last lines
    # A command that exits 0 and prints nothing: said as such (the message ended in "last lines:" and nothing)
    with pytest.raises(SiestaError, match=r"SIESTA stopped before 'Job completed' \(exit status 0\) and printed "
                                          r"nothing \(is the command SIESTA\?\)"):
        run_siesta(run_dir / "input.fdf", command=str(fake_siesta(tmp_path, "")))
    # A program that writes bytes other than text (to stdout and stderr): its last lines are shown as text, not
    # as terminal control codes, and its stderr does not stop the run with a UnicodeDecodeError
    garbage = tmp_path / "garbage_siesta"
    garbage.write_text(f"#!{sys.executable}\nimport sys\nsys.stdout.buffer.write(bytes(range(256)) * 2)\n"
                       "sys.stderr.buffer.write(b'\\xff\\x1b[2J oops')\nsys.exit(1)\n")
    garbage.chmod(garbage.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(SiestaError, match="exit status 1") as err:
        run_siesta(run_dir / "input.fdf", command=str(garbage))
    shown = str(err.value).split("last lines:", 1)[1]
    assert "\x1b" not in shown and all(c.isprintable() or c in "\n\t" for c in shown) and "oops" in shown


def test_not_converged_is_an_error_unless_allowed(run_dir, tmp_path):
    text = GOOD.replace("SCF cycle converged after 2 iterations", "SCF_NOT_CONV")
    exe = fake_siesta(tmp_path, text)
    with pytest.raises(SiestaError, match="did not converge after 2 iterations"):
        run_siesta(run_dir / "input.fdf", command=str(exe))
    assert not run_siesta(run_dir / "input.fdf", command=str(exe), allow_unconverged=True).output.converged


@pytest.mark.parametrize("edit", [lambda t: re.sub(r"   scf:.*\n", "", t), lambda t: t.replace("-465.674271", "*********")])
def test_a_converged_output_without_scf_lines_or_a_finite_energy_is_no_result(run_dir, tmp_path, edit):
    """A wrapper or broken build saying "converged" with no energy crashed bench's summary (a bare TypeError, kept
    for every rerun), or gave a report with |ΔE| nan and no warning."""
    exe = fake_siesta(tmp_path, edit(GOOD))
    with pytest.raises(SiestaError, match="converged but holds no scf: lines or no finite total energy"):
        run_siesta(run_dir / "input.fdf", command=str(exe))


def test_a_converged_run_that_printed_no_job_completed_is_a_result(run_dir, tmp_path):
    """SIESTA 4.1 prints "Job completed" last, after its timers; a converged run whose output ends before it (a
    wrapper that cuts the tail, an MPI abort at finalization) still holds the answer, and is read as one."""
    cut = GOOD.replace("Job completed\n", "")
    run = run_siesta(run_dir / "input.fdf", command=str(fake_siesta(tmp_path, cut)))
    assert run.output.converged and run.output.scf_iterations == 2 and not run.output.job_completed


def test_missing_pseudopotential_is_named_before_running(run_dir, tmp_path):
    (run_dir / "H.psf").unlink()
    with pytest.raises(InputFileError, match="H.psf"):
        run_siesta(run_dir / "input.fdf", command=str(fake_siesta(tmp_path, GOOD)))
    (run_dir / "O.psf").unlink()  # a folder copied without any: every one named, not only the first
    with pytest.raises(InputFileError, match=r"pseudopotentials O.psf, H.psf \(or .psml.*for species 'O', 'H' not"):
        run_siesta(run_dir / "input.fdf", command=str(fake_siesta(tmp_path, GOOD)))


@pytest.mark.parametrize("init", ["atomic", "ml"])
def test_a_run_that_cannot_be_prepared_leaves_no_folder_behind(run_dir, tmp_path, init):
    """A missing pseudopotential (or, for the ML guess, a missing predicted DM) used to be found only after the
    run folder and its fdf were written, leaving an empty run under bench's --out."""
    (run_dir / "H.psf").unlink()
    pred = tmp_path / "pred.DM"
    pred.write_bytes(b"predicted")
    with pytest.raises(InputFileError, match="species 'H' not found"):
        prepare_run(run_dir / "input.fdf", tmp_path / "out" / "w", init, dm_file=pred)
    assert not (tmp_path / "out").exists()
    (run_dir / "H.psf").write_text("fake")
    with pytest.raises(InputFileError, match="needs a predicted .DM"):
        prepare_run(run_dir / "input.fdf", tmp_path / "out" / "w", "ml", dm_file=tmp_path / "absent.DM")
    assert not (tmp_path / "out").exists()


def test_a_dangling_pseudopotential_link_is_named_with_its_target(run_dir, tmp_path):
    (run_dir / "H.psf").unlink()
    (run_dir / "H.psml").symlink_to(tmp_path / "nowhere" / "H.psml")
    with pytest.raises(InputFileError, match=r"species 'H' not found: H.psml links to .*nowhere/H.psml, which does"):
        run_siesta(run_dir / "input.fdf", command=str(fake_siesta(tmp_path, GOOD)))


def test_templates_replace_dm_keys(run_dir, tmp_path):
    text = apply_dm_init(FDF + "dm.use-save-dm true\n", "ml")
    keys = [l.split()[0].lower() for l in text.splitlines() if l.strip() and not l.startswith("#")]
    assert keys.count("dm.usesavedm") == 1 and "DM.UseSaveDM T" in text
    assert "dm.use-save-dm" not in keys and "DM.UseSaveDM F" not in text
    # keys that make SIESTA take its atoms from a saved file (not copied into the run): the runs use the fdf's
    text = apply_dm_init(FDF + "MD.UseSaveXV T\nmd.use-struct-file T\n", "atomic")
    assert "usesavexv" not in text.lower() and "struct" not in text.lower()


def test_prepare_run_atomic_removes_stale_dm_and_ml_copies_it(run_dir, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    (work / "water.DM").write_bytes(b"stale")
    fdf = prepare_run(run_dir / "input.fdf", work, "atomic")
    assert not (work / "water.DM").exists() and "DM.UseSaveDM F" in fdf.read_text()
    pred = tmp_path / "pred.DM"
    pred.write_bytes(b"predicted")
    prepare_run(run_dir / "input.fdf", work, "ml", dm_file=pred)
    assert (work / "water.DM").read_bytes() == b"predicted"
    with pytest.raises(InputFileError, match="needs a predicted .DM"):
        prepare_run(run_dir / "input.fdf", tmp_path / "w2", "ml")


def test_prepare_run_in_its_own_folder_keeps_the_pseudopotentials(run_dir, tmp_path):
    """A run prepared in the folder that holds its fdf and pseudopotentials (an interrupted run started again)
    used to end in shutil.SameFileError; a stale copy in another work folder is still replaced by the fdf's own."""
    before = (run_dir / "H.psf").read_text()
    fdf = prepare_run(run_dir / "input.fdf", run_dir, "atomic")
    assert fdf == run_dir / "input.fdf" and (run_dir / "H.psf").read_text() == before
    other = tmp_path / "pseudos"
    other.mkdir()
    (other / "H.psf").write_text("another H")
    work = tmp_path / "w"
    work.mkdir()
    (work / "H.psf").write_text("stale H")
    prepare_run(run_dir / "input.fdf", work, "atomic", pseudo_dirs=[other])
    assert (work / "H.psf").read_text() == before  # the fdf's own folder comes first, as before


def test_benchmark_report_marks_structures_the_model_flags_as_novel(tmp_path):
    """bench on a dataset folder with a fake SIESTA: per-structure rows carry the novelty score and the flag,
    the Markdown table shows them and counts the flagged structures."""
    from siesta_dmguess.bench import markdown, run_benchmark
    from siesta_dmguess.siesta.templates import fdf_with_geometry

    from .conftest import water_molecule

    data = tmp_path / "data"
    (data / "basis").mkdir(parents=True)
    for label in ("O", "H"):
        (data / "basis" / f"{label}.psf").write_text("fake")
    molecule = water_molecule()
    molecule.set_cell([10.0, 10.0, 10.0])
    for k in range(2):
        (data / f"{k:04d}").mkdir()
        (data / f"{k:04d}" / "input.fdf").write_text(fdf_with_geometry(FDF, molecule, molecule.get_chemical_symbols()))
    reports = []
    for threshold in (1e-6, 1e6):  # flagged by a near-zero threshold, not by a huge one
        tiny_model(tmp_path / f"model{threshold:g}", threshold)
        reports.append(run_benchmark(data, tmp_path / f"model{threshold:g}", tmp_path / f"out{threshold:g}",
                                     split=None, command=str(fake_siesta(tmp_path, GOOD)), progress=False))
    flagged, calm = reports
    assert [r["flagged"] for r in flagged["per_structure"]] == [True, True]
    assert [r["flagged"] for r in calm["per_structure"]] == [False, False]
    assert all(r["novelty"] > 0 for r in flagged["per_structure"])
    assert flagged["structures_flagged_novel"] == 2 and calm["structures_flagged_novel"] == 0
    table = markdown(flagged)
    assert "(flagged)" in table and "flagged as novel: 2 of 2" in table
    # The one-off start-up (loading the model, warming it up) is reported apart from the per-structure times.
    assert flagged["startup_s"] > 0 and f"{flagged['startup_s']:.1f} s of start-up once" in table
    assert "(flagged)" not in markdown(calm)
    # With a near-zero threshold the structures are also *far* outside the training data: their "ml" runs start
    # from the atomic guess (no predicted DM, the atomic template), as predict and the calculator would do.
    assert all("far outside the training data" in r["fallback"] and r["fallback_kind"] == "far"
               for r in flagged["per_structure"])
    assert not any(r["fallback"] for r in calm["per_structure"])
    assert flagged["structures_fallback_atomic"] == 2 and calm["structures_fallback_atomic"] == 0
    assert "far: atomic guess used" in table and "started from the atomic guess: 2" in table
    fdf = (tmp_path / "out1e-06" / "data" / "0000" / "ml" / "input.fdf").read_text()
    assert "DM.UseSaveDM F" in fdf and not (tmp_path / "out1e-06" / "data" / "0000" / "predicted.DM").exists()
    assert "DM.UseSaveDM T" in (tmp_path / "out1e+06" / "data" / "0000" / "ml" / "input.fdf").read_text()


def test_repeated_bench_alternates_guesses_and_keeps_the_median_run(tmp_path):
    """bench --repeat 3 runs atomic, ml, atomic, ml, atomic, ml (a slow spell hits both guesses) and keeps each
    guess's median-time run with every run's numbers beside it."""
    from siesta_dmguess.bench import bench_structure, markdown, summarize
    from siesta_dmguess.card import load_model

    log, script = logging_siesta(tmp_path)
    run = water_run(tmp_path / "data" / "0000")
    tiny_model(tmp_path / "model")
    result = bench_structure(run / "input.fdf", tmp_path / "out", load_model(tmp_path / "model"),
                             command=str(script), repeat=3)
    assert log.read_text().split() == ["atomic", "ml"] * 3
    for guess in ("atomic", "ml"):
        r = result.results[guess]
        assert len(r.wall_samples) == 3 and r.iteration_samples == [2, 2, 2]
        assert r.siesta_wall_s == sorted(r.wall_samples)[1]
    ml = result.results["ml"]
    assert ml.prediction_s == sorted(ml.prediction_samples)[1] and all(t > 0 for t in ml.prediction_samples)
    report = summarize([result], "tiny", "data") | {"repeat": 3}
    spreads = [(max(r.wall_samples) - min(r.wall_samples)) / min(r.wall_samples) for r in result.results.values()]
    assert report["wall_spread_max"] == pytest.approx(max(spreads))
    table = markdown(report)
    assert "median-time run of 3" in table and f"{ml.siesta_wall_s + ml.prediction_s:.2f}" in table
    assert f"differed by up to {100 * report['wall_spread_max']:.0f} %" in table
    single = bench_structure(run / "input.fdf", tmp_path / "out1", load_model(tmp_path / "model"), command=str(script))
    assert single.results["ml"].wall_samples == [] and log.read_text().split()[-2:] == ["atomic", "ml"]
    single_report = summarize([single], "tiny", "data")
    assert single_report["wall_spread_max"] is None and "median-time" not in markdown(single_report)
    # a report of training structures, another refinement or forced predictions says so above its table (it
    # looked like any validation report: the settings were in its JSON alone)
    assert "Split" not in markdown(single_report | {"split": "val", "refine": "idempotent"})
    noted = markdown(single_report | {"split": "train", "refine": "charge", "forced": True})
    assert ("Split `train`: structures the model may have trained on. Refinement `charge` (the default is "
            "`idempotent`). `--force`: the predictions `predict` refuses are used too.") in noted


def test_bench_checks_every_run_against_the_model_before_running_siesta(tmp_path):
    """A run the model does not cover stops the benchmark before SIESTA runs any, naming the run; with
    skip_incompatible the others are run and the skipped one is listed in the report."""
    from siesta_dmguess.bench import markdown, run_benchmark
    from siesta_dmguess.errors import ModelCompatibilityError

    log, script = logging_siesta(tmp_path)
    water_run(tmp_path / "data" / "0000")
    # The same molecule with its oxygen relabelled as nitrogen: a species the H/O model does not have.
    water_run(tmp_path / "data" / "0001", FDF.replace(" 1 8 O", " 1 7 N"), labels=("N", "H"))
    tiny_model(tmp_path / "model")
    kwargs = dict(model=tmp_path / "model", out_dir=tmp_path / "out", split=None, command=str(script), progress=False)
    with pytest.raises(ModelCompatibilityError) as err:
        run_benchmark(tmp_path / "data", **kwargs)
    message = str(err.value)
    assert "1 of 2 runs" in message and "['N']" in message and "0000" not in message
    assert str(tmp_path / "data" / "0001" / "input.fdf") in message  # the error names the file
    assert not log.exists()  # nothing was run
    report = run_benchmark(tmp_path / "data", skip_incompatible=True, **kwargs)
    assert report["structures"] == 1 and report["per_structure"][0]["name"] == "0000"
    assert list(report["skipped"]) == ["0001"] and log.read_text().split() == ["atomic", "ml"]
    assert "- 0001: species ['N']" in markdown(report)  # the report names the run, not this machine's path


def test_bench_on_a_split_no_run_records_names_the_splits_there_are(tmp_path):
    import json

    from siesta_dmguess.bench import run_benchmark

    log, script = logging_siesta(tmp_path)
    for run_id in ("0000", "0001"):
        water_run(tmp_path / "data" / run_id)
    index = [{"id": "0000", "split": "train"}, {"id": "0001", "split": "test"}]
    (tmp_path / "data" / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputFileError, match=r"data: no runs in split 'val'; the runs record test \(1\), train "
                                             r"\(1\); --split all takes every run"):
        run_benchmark(tmp_path / "data", model="water", out_dir=tmp_path / "out", split="val", command=str(script))
    assert not log.exists()


def test_a_stopped_bench_continues_where_it_stopped(tmp_path, caplog):
    """A benchmark killed in its second structure, started again, runs only that structure and reports both; a
    result measured otherwise (another refinement, another SIESTA) or unreadable is run again, and
    ``resume=False`` (``--restart``) runs everything again."""
    from siesta_dmguess.bench import RESULT_FILE, markdown, run_benchmark
    from siesta_dmguess.errors import SiestaError

    log, script = logging_siesta(tmp_path)
    log.write_text("")
    stop = tmp_path / "stop"  # while it exists, the third SIESTA run (the second structure's first) crashes
    crashing = tmp_path / "crashing_siesta"
    crashing.write_text(f"#!{sys.executable}\nimport os, subprocess, sys\n"
                        f"if os.path.exists({str(stop)!r}) and len(open({str(log)!r}).read().split()) == 2:\n"
                        f"    sys.exit(1)\n"
                        f"sys.stdout.write(subprocess.run([{str(script)!r}], input=sys.stdin.read(), text=True, "
                        f"capture_output=True).stdout)\n")
    crashing.chmod(crashing.stat().st_mode | stat.S_IEXEC)
    for k in range(2):
        water_run(tmp_path / "data" / f"{k:04d}")
    tiny_model(tmp_path / "model")
    kwargs = dict(model=tmp_path / "model", out_dir=tmp_path / "out", split=None, command=str(crashing),
                  progress=False)
    stop.write_text("")
    with pytest.raises(SiestaError):
        run_benchmark(tmp_path / "data", **kwargs)
    assert log.read_text().split() == ["atomic", "ml"]
    assert (tmp_path / "out" / "data" / "0000" / RESULT_FILE).is_file()
    assert not (tmp_path / "out" / "data" / "0001" / RESULT_FILE).exists()
    stop.unlink()
    with caplog.at_level("WARNING"):
        resumed = run_benchmark(tmp_path / "data", **kwargs)
    assert log.read_text().split() == ["atomic", "ml"] * 2  # only the unfinished structure ran
    assert "1 of 2 structures were finished by an earlier run" in caplog.text
    assert resumed["reused"] == ["0000"] and resumed["structures"] == 2
    assert [r["name"] for r in resumed["per_structure"]] == ["0000", "0001"]
    assert resumed["scf_iterations_atomic"] == 4 and resumed["scf_iterations_ml"] == 4
    assert "(1): 0000." in markdown(resumed)
    again = run_benchmark(tmp_path / "data", **kwargs)  # both finished: nothing runs, the same report
    assert len(log.read_text().split()) == 4 and again["reused"] == ["0000", "0001"]
    assert again["per_structure"] == resumed["per_structure"]


def test_a_bench_rerun_with_another_refinement_redoes_only_the_ml_runs(tmp_path, caplog):
    """The atomic guess does not depend on the model or the refinement, but a rerun with --refine charge (or
    another model, or --force) ran it again for every structure, doubling the SIESTA time of such comparisons.
    A changed fdf, another --repeat or --restart still runs it again."""
    from siesta_dmguess.bench import markdown, run_benchmark

    log, script = logging_siesta(tmp_path)
    for run_id in ("0000", "0001"):
        water_run(tmp_path / "data" / run_id)
    tiny_model(tmp_path / "model")
    kwargs = dict(model=tmp_path / "model", out_dir=tmp_path / "out", split=None, command=str(script), progress=False)
    first = run_benchmark(tmp_path / "data", **kwargs)
    assert log.read_text().split() == ["atomic", "ml"] * 2 and first["atomic_reused"] == []
    with caplog.at_level("WARNING"):
        charge = run_benchmark(tmp_path / "data", refine="charge", **kwargs)
    assert log.read_text().split() == ["atomic", "ml"] * 2 + ["ml"] * 2
    assert charge["atomic_reused"] == ["0000", "0001"] and charge["reused"] == []
    assert charge["scf_iterations_atomic"] == first["scf_iterations_atomic"] and charge["refine"] == "charge"
    assert "only their ML runs were redone" in caplog.text and "only the ML runs were redone (2)" in markdown(charge)
    fdf = tmp_path / "data" / "0001" / "input.fdf"
    fdf.write_text(fdf.read_text() + "MeshCutoff 200 Ry\n")  # another measurement: both of its runs again
    changed = run_benchmark(tmp_path / "data", **kwargs)
    assert log.read_text().split()[6:] == ["ml", "atomic", "ml"] and changed["atomic_reused"] == ["0000"]
    run_benchmark(tmp_path / "data", repeat=2, **kwargs)
    assert log.read_text().split()[9:] == ["atomic", "ml"] * 4
    again = run_benchmark(tmp_path / "data", repeat=2, refine="charge", **kwargs)  # repeated runs alternate: no
    assert log.read_text().split()[17:] == ["atomic", "ml"] * 4 and again["atomic_reused"] == []  # atomic reused
    restarted = run_benchmark(tmp_path / "data", resume=False, **kwargs)
    assert log.read_text().split()[25:] == ["atomic", "ml"] * 2 and restarted["atomic_reused"] == []


def test_a_kept_bench_result_is_reused_only_where_it_was_measured_alike(tmp_path, caplog):
    """finished_result gives back what save_result kept, and None, so that the structure runs again, where the
    result was measured otherwise (each item of the identity) or cannot be read (a warning names the file)."""
    from siesta_dmguess.bench import (RESULT_FILE, GuessResult, StructureResult, finished_result, run_identity,
                                      save_result)

    run = water_run(tmp_path / "data" / "0000")
    tiny_model(tmp_path / "model")
    from siesta_dmguess.card import load_model

    loaded = load_model(tmp_path / "model")
    identity = run_identity(run / "input.fdf", loaded, "idempotent", False, 1, ["/opt/siesta"])
    result = StructureResult("0000", 3, {g: GuessResult(g, it, True, g == "ml", -465.0, 1.5, 0.1, [0.1, 1e-6])
                                         for g, it in (("atomic", 10), ("ml", 3))}, 0.2, False, "", "", "model")
    work = tmp_path / "out"
    assert finished_result(work, identity) is None  # nothing kept yet
    work.mkdir()
    save_result(work, identity, result)
    assert finished_result(work, identity) == result
    others = [run_identity(run / "input.fdf", loaded, "charge", False, 1, ["/opt/siesta"]),
              run_identity(run / "input.fdf", loaded, "idempotent", True, 1, ["/opt/siesta"]),
              run_identity(run / "input.fdf", loaded, "idempotent", False, 3, ["/opt/siesta"]),
              run_identity(run / "input.fdf", loaded, "idempotent", False, 1, ["/usr/bin/siesta"])]
    (run / "O.psf").write_text("another pseudopotential")
    others.append(run_identity(run / "input.fdf", loaded, "idempotent", False, 1, ["/opt/siesta"]))
    (run / "input.fdf").write_text((run / "input.fdf").read_text() + "%include mesh.fdf\n")
    (run / "mesh.fdf").write_text("MeshCutoff 200 Ry\n")
    others.append(run_identity(run / "input.fdf", loaded, "idempotent", False, 1, ["/opt/siesta"]))
    (run / "mesh.fdf").write_text("MeshCutoff 300 Ry\n")  # only an included file changes
    others.append(run_identity(run / "input.fdf", loaded, "idempotent", False, 1, ["/opt/siesta"]))
    tiny_model(tmp_path / "model2", novelty_threshold=1.0)  # other weights (tiny_model is seeded)
    others.append({**identity, "weights_sha256": load_model(tmp_path / "model2").card["weights_sha256"]})
    # The same weights with another config.json (it builds another network) or another flag level of refusals:
    # the results were reused before.
    import json
    import shutil

    shutil.copytree(tmp_path / "model", tmp_path / "model3")
    config = json.loads((tmp_path / "model3" / "config.json").read_text())
    (tmp_path / "model3" / "config.json").write_text(json.dumps({**config, "mp_cutoff": 2.5}))
    other = load_model(tmp_path / "model3")
    assert other.card["weights_sha256"] == loaded.card["weights_sha256"]
    others.append(run_identity(run / "input.fdf", other, "idempotent", False, 1, ["/opt/siesta"]) | {
        "fdf_sha256": identity["fdf_sha256"], "pseudopotentials": identity["pseudopotentials"], "model": "model"})
    other.model.novelty_threshold.fill_(123.0)
    others.append({**identity, "novelty_threshold": 123.0})
    assert all(other != identity for other in others) and others[-3] != others[-2]
    assert all(finished_result(work, other) is None for other in others)
    assert finished_result(work, identity) == result  # still there for its own identity
    for broken in ("{ truncated", '{"identity": {}}', "[1, 2]"):
        (work / RESULT_FILE).write_text(broken)
        caplog.clear()
        with caplog.at_level("INFO"):
            assert finished_result(work, identity) is None
        assert str(work / RESULT_FILE) in caplog.text


def test_a_prediction_siesta_did_not_read_is_said_in_the_report(tmp_path):
    """The JSON had dm_read false, but the table and the total claimed the ML guess's saving."""
    from siesta_dmguess.bench import markdown, run_benchmark

    data = water_run(tmp_path / "data" / "0000").parent
    tiny_model(tmp_path / "model")
    unread = GOOD.replace("Attempting to read DM from file... Succeeded...\n", "")
    report = run_benchmark(data, tmp_path / "model", tmp_path / "out", split=None, progress=False,
                           command=str(fake_siesta(tmp_path, unread)))
    assert not report["all_dm_read"]
    table = markdown(report)
    assert "| 2 (DM not read) |" in table and "**SIESTA did not read the predicted DM** in 1 run(s)" in table
    read = run_benchmark(data, tmp_path / "model", tmp_path / "out2", split=None, progress=False,
                         command=str(fake_siesta(tmp_path, GOOD)))
    assert "not read" not in markdown(read)


def test_a_relative_siesta_command_is_run_from_any_folder(tmp_path, monkeypatch):
    """`--siesta ./siesta` was found here, then not in the run's folder: a bare FileNotFoundError."""
    exe = fake_siesta(tmp_path, GOOD)
    monkeypatch.chdir(tmp_path)
    assert find_siesta(f"./{exe.name} -flag") == [str(exe), "-flag"]
    assert find_siesta(f"{exe} -np 2 ./{exe.name}") == [str(exe), "-np", "2", str(exe)]  # mpirun ... ./siesta


def test_a_kept_trajectory_frame_whose_converged_dm_is_gone_is_run_again(tmp_path, caplog):
    """A frame's kept result is only half of it: the next frames' history guesses start from its converged DMs.
    Where one of those is gone or truncated, the frame is run again (a warning names the file)."""
    from siesta_dmguess.bench import _kept_run, save_kept

    identity = {"fdf_sha256": "abc", "siesta": ["/opt/siesta"]}
    run = tmp_path / "0001" / "atomic"
    (run / "run").mkdir(parents=True)
    save_kept(run, identity, {"result": {"scf_iterations": 9}, "dm_file": "run/water.DM"})
    for content in (None, b"\x00" * 8):
        if content is not None:
            (run / "run" / "water.DM").write_bytes(content)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert _kept_run(run, identity, geometry=None) is None
        assert str(run / "run" / "water.DM") in caplog.text


def test_bench_restart_runs_every_structure_again(tmp_path, monkeypatch):
    """--restart is resume=False; without it a dataset benchmark resumes."""
    import siesta_dmguess.bench as bench
    from siesta_dmguess.cli import main

    calls = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *args, **kwargs: calls.append(kwargs) or {})
    monkeypatch.setattr(bench, "markdown", lambda report: "")
    for extra in ([], ["--restart"]):
        assert main(["bench", str(tmp_path), *extra]) == 0
    assert [c["resume"] for c in calls] == [True, False]
    # --quiet turns the progress bar off, for both kinds of benchmark, as for train and evaluate
    monkeypatch.setattr(bench, "run_trajectory_benchmark", lambda *args, **kwargs: calls.append(kwargs) or {})
    monkeypatch.setattr(bench, "trajectory_markdown", lambda report: "")
    calls.clear()
    for extra in ([], ["--quiet"], ["--fdf", "x.fdf"], ["--fdf", "x.fdf", "--quiet"]):
        assert main(["bench", str(tmp_path), *extra]) == 0
    assert [c["progress"] for c in calls] == [True, False, True, False]


def test_median_run_picks_a_real_run_and_warns_when_iterations_differ(caplog):
    from siesta_dmguess.bench import GuessResult, median_run

    runs = [GuessResult("ml", it, True, True, -1.0, wall, pred) for it, wall, pred in
            [(9, 5.0, 0.3), (9, 4.0, 0.5), (10, 9.0, 0.1), (9, 4.5, 0.2)]]
    with caplog.at_level("WARNING"):
        middle = median_run(runs)
    # Four runs: the lower middle wall time (4.5 s) is a real run's, and its iterations come with it.
    assert middle.siesta_wall_s == 4.5 and middle.scf_iterations == 9
    assert middle.prediction_s == 0.25 and middle.iteration_samples == [9, 9, 10, 9]
    assert "differ between repeated runs" in caplog.text
    assert median_run(runs[:1]) is runs[0]


def test_bench_rejects_a_repeat_on_a_trajectory(tmp_path, capsys):
    from siesta_dmguess.cli import main

    assert main(["bench", str(tmp_path), "--repeat", "2", "--fdf", "x.fdf"]) != 0
    assert "--repeat" in capsys.readouterr().err


@pytest.mark.parametrize("options, named", [
    (["--fdf", "x.fdf", "--skip-incompatible"], "--skip-incompatible"),
    (["--fdf", "x.fdf", "--split", "val"], "--split applies"),
    (["--depth", "2"], "--depth applies"), (["--guesses", "atomic,reuse"], "--guesses applies"),
    (["--depth", "3", "--guesses", "ml"], "--guesses and --depth apply")])
def test_bench_refuses_options_of_the_other_kind_of_benchmark(tmp_path, capsys, options, named):
    """Trajectory-only options on a dataset folder (and the reverse) used to be ignored silently; the error comes
    before any file is read (tmp_path holds no runs)."""
    from siesta_dmguess.cli import main

    assert main(["bench", str(tmp_path), *options]) != 0
    err = capsys.readouterr().err
    assert named in err and "trajectory" in err


def test_a_guess_given_twice_is_refused_before_any_run(tmp_path):
    """``--guesses atomic,reuse,reuse`` ran reuse twice per frame, the second from the DM the first had just
    converged: 1 iteration a frame, a saving that is not there."""
    from siesta_dmguess.bench import run_trajectory_benchmark
    from siesta_dmguess.errors import DMGuessError

    with pytest.raises(DMGuessError, match="starting guesses given more than once: reuse"):
        run_trajectory_benchmark(tmp_path / "none.traj", tmp_path / "none.fdf", guesses=("atomic", "reuse", "reuse"),
                                 command=str(fake_siesta(tmp_path, GOOD)))


@pytest.mark.parametrize("command", ["bench", "train"])
@pytest.mark.parametrize("out", ["afile", "afile/sub"])
def test_an_output_folder_a_file_is_in_the_way_of_is_named(tmp_path, capsys, command, out):
    """A file in the way of --out (or of its parent) was a bare FileExistsError / NotADirectoryError."""
    from siesta_dmguess.cli import main

    data = water_run(tmp_path / "data" / "0000").parent
    (tmp_path / "afile").write_text("kept")
    options = ["--epochs", "1"] if command == "train" else ["--siesta", str(fake_siesta(tmp_path, GOOD))]
    assert main([command, str(data), "--out", str(tmp_path / out), *options]) == 2
    err = capsys.readouterr().err
    assert "afile" in err and ("a file is in the way of the output folder" in err or "cannot create the output "
                               "folder (--out): " in err), err
    assert (tmp_path / "afile").read_text() == "kept"


@pytest.mark.parametrize("command, hint", [("train", "checkpoint of the last finished epoch"),
                                           ("bench", "already run are kept"), ("predict", "")])
def test_ctrl_c_is_one_line_saying_what_is_kept(monkeypatch, capsys, tmp_path, command, hint):
    from siesta_dmguess import cli

    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser

    def patched():
        p = parser()
        p._subparsers._group_actions[0].choices[command].set_defaults(func=interrupted)
        return p

    monkeypatch.setattr(cli, "build_parser", patched)
    monkeypatch.chdir(tmp_path)
    if command == "train":  # a checkpoint is there to resume from
        (tmp_path / "y").mkdir()
        (tmp_path / "y" / "checkpoint.pt").write_bytes(b"")
    assert cli.main([command, "x", *(["--out", "y"] if command == "train" else [])]) == 130
    err = capsys.readouterr().err
    assert err.startswith("siesta-dmguess: interrupted") and hint in err and "Traceback" not in err
    if command == "train":  # stopped while reading the data: nothing to resume
        assert cli.main([command, "x", "--out", "z"]) == 130
        assert "before the first epoch finished: nothing was kept" in capsys.readouterr().err
    if command in ("train", "bench"):  # the same command with --restart would start afresh, not resume
        assert cli.main([command, "x", "--restart", *(["--out", "y"] if command == "train" else [])]) == 130
        assert "run the same command without --restart" in capsys.readouterr().err


@pytest.mark.parametrize("command, option, value", [
    ("bench", "--repeat", "0"), ("bench", "--limit", "-1"), ("bench", "--depth", "0"), ("bench", "--threads", "-1"),
    ("predict", "--threads", "-2"), ("evaluate", "--threads", "-1"), ("train", "--epochs", "-5"),
    ("train", "--batch-atoms", "0"), ("bench", "--limit", "two"), ("train", "--lr", "-1"),
    ("train", "--correction-lr", "0"), ("train", "--loss-power", "nan"), ("train", "--lr", "fast")])
def test_counts_out_of_range_are_refused_before_any_work(tmp_path, capsys, command, option, value):
    """``--limit -1`` used to slice off the last structure, ``--depth 0`` ended in a traceback."""
    from siesta_dmguess.cli import main

    positional = {"bench": [str(tmp_path)], "predict": ["x.xyz"], "evaluate": ["water", str(tmp_path)],
                  "train": [str(tmp_path), "--out", str(tmp_path / "m")]}[command]
    with pytest.raises(SystemExit) as exit_:
        main([command, *positional, option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and any(reason in err for reason in (
        "must be at least", "not a whole number", "must be a number above 0", "is not a number"))


def test_trajectory_table_marks_frames_started_from_the_atomic_guess():
    """A frame whose ML guesses fell back to the atomic guess is marked in the trajectory table, and the table
    says why; a trajectory without such frames has no such line."""
    from siesta_dmguess.bench import summarize_trajectory, trajectory_markdown

    def result(guess, iterations):
        return {"guess": guess, "scf_iterations": iterations, "converged": True, "total_energy_eV": -465.0,
                "siesta_wall_s": 1.0, "prediction_s": 0.1}

    reason = "far outside the training data of model m (novelty 900, more than 100x its flag level 3.00)"
    sampling = ("the run samples the crystal with a period of 5.45 Å (its k-grid's supercell), shorter than the "
                "7.77 Å its DM reaches, and model m was trained only on runs sampled more finely")
    rows = [{"frame": 0, "atomic": result("atomic", 10), "ml": result("ml", 4)},
            {"frame": 1, "atomic": result("atomic", 11), "ml": result("atomic", 11), "fallback": reason,
             "fallback_kind": "far"},
            {"frame": 2, "atomic": result("atomic", 12), "ml": result("atomic", 12), "fallback": sampling,
             "fallback_kind": "k-sampling"}]
    report = summarize_trajectory(rows, ("atomic", "ml"), "m", "md.traj")
    table = trajectory_markdown(report)
    assert report["frames_fallback_atomic"] == 2
    assert "| 1 (far: no ML prediction) | 11 | 11 |" in table and "| 0 | 10 | 4 |" in table
    assert "| 2 (k-sampling: no ML prediction) | 12 | 12 |" in table
    assert f"2 of 3 frames got no ML prediction (`ml` started from the atomic guess, `ml+residual` from the " \
           f"history's extrapolation once there was one): {reason} (and alike)." in table
    calm = trajectory_markdown(summarize_trajectory(rows[:1], ("atomic", "ml"), "m", "md.traj"))
    assert "no ML prediction" not in calm
    assert "SIESTA:" not in calm  # a report written before the SIESTA that ran was recorded
    assert trajectory_markdown(report | {"siesta": "/opt/siesta/bin/siesta"}).endswith(
        "\n\nSIESTA: `/opt/siesta/bin/siesta`.\n")


def test_bench_tables_read_back_to_their_totals():
    """The model cards and the summary plot read the committed tables back (read_markdown_totals): each table
    gives the totals it was written from, and other text is an error."""
    from siesta_dmguess.bench import (GuessResult, StructureResult, markdown, read_markdown_totals, summarize,
                                      summarize_trajectory, trajectory_markdown)
    from siesta_dmguess.errors import DMGuessError

    def run(guess, iterations):
        return GuessResult(guess, iterations, True, True, -465.0, 1.0, 0.1)

    rows = [StructureResult(f"{k:04d}", 3, {"atomic": run("atomic", a), "ml": run("ml", m)}, 0.5, False)
            for k, (a, m) in enumerate([(10, 4), (9, 7)])]
    report = summarize(rows, "/models/water", "/data/h2o")
    # the wall times as the table rounds them (to 0.1 s), read back for the cards' held-out timings
    walls = {key: round(report[key], 1) for key in ("wall_s_atomic", "wall_s_ml_including_prediction")}
    assert read_markdown_totals(markdown(report)) == {"kind": "set", "name": "h2o", "model": "water", "atomic": 19,
                                                      "ml": 11, **walls}
    assert read_markdown_totals(markdown(report | {"startup_s": 3.14}))["startup_s"] == 3.1
    frames = [{"frame": t, **{g: {**run(g, n).__dict__} for g, n in zip(("atomic", "ml", "ml+residual"), its)}}
              for t, its in enumerate([(10, 5, 5), (11, 6, 4)])]
    traj = trajectory_markdown(summarize_trajectory(frames, ("atomic", "ml", "ml+residual"), "/m/silicon", "md.traj"))
    assert read_markdown_totals(traj) == {"kind": "trajectory", "name": "md", "model": "silicon",
                                          "totals": {"atomic": 21, "ml": 11, "ml+residual": 9}}
    # bench --name: a rerun from a renamed file keeps the report's name (an .xyz trajectory reads back too)
    named = summarize_trajectory(frames, ("atomic", "ml"), "/m/water", "/tmp/w8_relax.xyz") | {"name": "water8_relax"}
    assert read_markdown_totals(trajectory_markdown(named))["name"] == "water8_relax"
    unnamed = summarize_trajectory(frames, ("atomic", "ml"), "/m/water", "/tmp/scan.xyz")
    assert read_markdown_totals(trajectory_markdown(unnamed))["name"] == "scan.xyz"
    renamed = summarize(rows, "/models/water", "/copy/of/h2o-set") | {"name": "h2o"}
    assert read_markdown_totals(markdown(renamed))["name"] == "h2o"
    with pytest.raises(DMGuessError, match="not a table"):
        read_markdown_totals("# SCF benchmark: h2o with water\n\nno totals here\n")


def test_benchmark_names_are_one_word_that_can_name_files():
    """``bench --name`` names the report's files, so a name with a path separator or a space is refused before
    any SIESTA run, with what is allowed."""
    from siesta_dmguess.bench import benchmark_name
    from siesta_dmguess.errors import DMGuessError

    assert benchmark_name(None, "water8") == "water8" and benchmark_name("water8_relax", "w8") == "water8_relax"
    for bad in ("../x", "a b", ""):
        with pytest.raises(DMGuessError, match="letters, digits"):
            benchmark_name(bad, "water8")


def test_dm_read_note_says_when_siesta_would_not_read_the_predicted_dm(tmp_path):
    """SIESTA 4.1 reads ``<SystemLabel>.DM`` from its folder, only with ``DM.UseSaveDM T``, and fdf keeps a key's
    first value (checked with SIESTA on h2o/0004: T appended after the dataset's F is ignored, 10 iterations;
    T on the first line, 2)."""
    from siesta_dmguess.siesta.templates import dm_read_note

    fdf = tmp_path / "run.fdf"
    base = "SystemLabel water\nDM.Tolerance 1.0d-5\n"
    fdf.write_text(base)
    assert "does not set DM.UseSaveDM (default F)" in dm_read_note(fdf, tmp_path / "water.DM")
    fdf.write_text(base + "DM.UseSaveDM F\nDM.UseSaveDM T\n")
    assert "sets DM.UseSaveDM F" in dm_read_note(fdf, tmp_path / "water.DM")
    fdf.write_text("DM.UseSaveDM T\n" + base + "DM.UseSaveDM F\n")
    assert dm_read_note(fdf, tmp_path / "water.DM") is None
    assert f"reads {tmp_path / 'water.DM'}, not" in dm_read_note(fdf, tmp_path / "other.DM")


def test_enable_dm_read_puts_the_switch_first_and_keeps_the_original(tmp_path):
    from siesta_dmguess.siesta.templates import dm_read_note, enable_dm_read

    fdf = tmp_path / "input.fdf"
    original = "SystemLabel water\nDM.UseSaveDM F\n"
    fdf.write_text(original)
    backup = enable_dm_read(fdf)
    assert backup == tmp_path / "input.fdf.bak" and backup.read_text() == original
    assert fdf.read_text().startswith("DM.UseSaveDM T") and fdf.read_text().endswith(original)
    assert dm_read_note(fdf, tmp_path / "water.DM") is None
    assert enable_dm_read(fdf) is None and not (tmp_path / "input.fdf.bak1").exists()  # already on: left alone


def test_trajectory_benchmark_refuses_an_unknown_guess_before_running_siesta(tmp_path, capsys):
    """A typo in --guesses is an error naming the guess and the choices, not a ValueError after the first frames'
    SIESTA runs (the files given do not even exist: nothing is read or run)."""
    from siesta_dmguess.cli import main
    from siesta_dmguess.history import GUESSES

    assert main(["bench", str(tmp_path / "md.traj"), "--fdf", str(tmp_path / "input.fdf"), "--guesses",
                 "atomic,ml+residul", "--siesta", "false", "--out", str(tmp_path / "bench")]) == 2
    err = capsys.readouterr().err
    assert "unknown starting guesses ['ml+residul']" in err and all(g in err for g in GUESSES)
    assert not (tmp_path / "bench").exists()


def test_with_fdf_keys_sets_each_key_once_where_fdf_reads_it(tmp_path):
    """``integration/benchmarks/with_fdf_keys.py`` (the README's runs at SIESTA's default SCF settings) writes the
    chosen split's runs with each key on the first line and the fdf's own line for it gone, in any spelling fdf
    accepts, so SIESTA cannot read the dataset's value instead; the other split stays out."""
    import json

    import sisl

    from .conftest import benchmark_script

    with_fdf_keys = benchmark_script("with_fdf_keys")

    data = tmp_path / "h2o"
    splits = {"0000": "train", "0004": "val"}
    for run_id in splits:
        water_run(data / run_id, FDF + "DM.Tolerance 1.0d-5\nscf.mixer.history 6\nMaxSCFIterations 200\n")
    (data / "basis").mkdir()
    (data / "basis" / "O.psf").write_text("pseudo\n")
    (data / "index.json").write_text(json.dumps([{"id": i, "split": split} for i, split in splits.items()]))
    with_fdf_keys.main([str(data), str(tmp_path / "out"), "--set", "DM.Tolerance 1.0d-4",
                        "--set", "SCF.Mixer.History 2"])
    out = tmp_path / "out" / "h2o"
    assert sorted(p.name for p in out.iterdir()) == ["0004", "basis", "index.json"]
    lines = (out / "0004" / "input.fdf").read_text().splitlines()
    assert lines[:2] == ["DM.Tolerance 1.0d-4", "SCF.Mixer.History 2"]
    assert not any(line.lower().startswith(("dm.tolerance 1.0d-5", "scf.mixer.history 6")) for line in lines)
    fdf = sisl.get_sile(str(out / "0004" / "input.fdf"))
    assert fdf.get("DM.Tolerance") == "1.0d-4" and fdf.get("SCF.Mixer.History", 0) == 2  # what SIESTA reads
    assert fdf.get("MaxSCFIterations", 0) == 200 and (out / "basis" / "O.psf").is_file()
    assert json.loads((out / "index.json").read_text()) == [{"id": "0004", "split": "val"}]


def test_bench_without_a_model_gives_each_run_the_shipped_model_of_its_species(tmp_path, monkeypatch):
    """``bench`` with ``--model auto`` (the default) on a folder mixing water and ammonia gives each run the model
    ``predict`` would pick, loads each model once, names each row's model and titles the report with all of them;
    a run no shipped model covers (Xe) is named before SIESTA runs any, or skipped and listed."""
    import siesta_dmguess.card as card
    from siesta_dmguess.bench import markdown, run_benchmark
    from siesta_dmguess.errors import ModelCompatibilityError

    from .conftest import dataset

    rotations = dataset("rotations")  # 0000-0003: H2O, 0004-0007: NH3
    data = tmp_path / "data"
    data.mkdir()
    (data / "basis").symlink_to(rotations / "basis")
    for run_id in ("0000", "0001", "0004"):
        (data / run_id).mkdir()
        (data / run_id / "input.fdf").write_text((rotations / run_id / "input.fdf").read_text())
    (data / "0009").mkdir()  # the water molecule with its oxygen made xenon
    xenon = (rotations / "0000" / "input.fdf").read_text().replace(" 1 8 O", " 1 54 Xe")
    (data / "0009" / "input.fdf").write_text(xenon)
    loads = []
    ready_model = card.ready_model
    monkeypatch.setattr(card, "ready_model", lambda name, **kw: loads.append(name) or ready_model(name, **kw))
    log, script = logging_siesta(tmp_path)
    kwargs = dict(out_dir=tmp_path / "out", split=None, command=str(script), progress=False)
    with pytest.raises(ModelCompatibilityError, match=r"1 of 4 runs do not fit the shipped models") as err:
        run_benchmark(data, **kwargs)
    assert "0009" in str(err.value) and "no shipped model covers species ['H', 'Xe']" in str(err.value)
    assert not log.exists()  # nothing was run
    loads.clear()
    report = run_benchmark(data, skip_incompatible=True, **kwargs)
    assert sorted(loads) == ["chno-molecules", "water"]  # each once, though two runs are water
    assert {r["name"]: r["model"] for r in report["per_structure"]} == {"0000": "water", "0001": "water",
                                                                        "0004": "chno-molecules"}
    assert report["model"] == "chno-molecules+water" and list(report["skipped"]) == ["0009"]
    table = markdown(report)
    assert "with chno-molecules+water" in table and "| 0004 (chno-molecules) |" in table
    # A named model is used for every run, and the rows do not repeat its name.
    report = run_benchmark(data, model="chno-molecules", skip_incompatible=True, **kwargs)
    assert {r["model"] for r in report["per_structure"]} == {"chno-molecules"} and report["structures"] == 3
    assert "| 0004 |" in markdown(report)


def test_trajectory_bench_without_a_model_uses_the_shipped_model_of_the_fdf_templates_species():
    """Along a trajectory ``auto`` picks once, from the fdf template, the model ``predict`` would pick; a named
    model is used as given."""
    from siesta_dmguess.predict import resolve_auto_model

    from .conftest import dataset

    for name, model in {"h2o": "water", "g2": "chno-molecules", "si8": "silicon"}.items():
        assert resolve_auto_model("auto", dataset(name) / "0004" / "input.fdf") == model
    assert resolve_auto_model("water", dataset("si8") / "0004" / "input.fdf") == "water"  # checked later, per run


@pytest.mark.parametrize("case", ["folder-with-fdf", "file-without-fdf", "empty-trajectory", "unknown-element"])
def test_bench_inputs_of_the_wrong_kind_are_named(tmp_path, capsys, run_dir, case):
    """Each used to end in a traceback (OSError: Not a BundleTrajectory, UnknownFileTypeError: Empty file) or in
    'dataset folder not found' for a file that exists."""
    from siesta_dmguess.cli import main

    siesta = str(fake_siesta(tmp_path, GOOD))
    (tmp_path / "empty.xyz").write_text("")
    (tmp_path / "xx.xyz").write_text("1\n\nXx 0 0 0\n")
    args = {"folder-with-fdf": [str(run_dir.parent), "--fdf", str(run_dir)],
            "file-without-fdf": [str(tmp_path / "xx.xyz")],
            "empty-trajectory": [str(tmp_path / "empty.xyz"), "--fdf", str(run_dir)],
            "unknown-element": [str(tmp_path / "xx.xyz"), "--fdf", str(run_dir)]}[case]
    assert main(["bench", *args, "--siesta", siesta, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search({"folder-with-fdf": "--fdf is for a trajectory file, and this is a folder",
                      "file-without-fdf": r"xx\.xyz: a file, where a dataset folder .* --fdf FDF",
                      "empty-trajectory": r"empty\.xyz: ASE cannot read",
                      "unknown-element": r"xx\.xyz: ASE cannot read this structure: unknown chemical symbol 'Xx'"}[case],
                     err), err


def test_a_trajectory_report_names_the_energies_it_checks_against():
    """Without the atomic guess the energy check ran against the first guess listed, under a "vs atomic" header,
    and a single guess showed 0.0 eV against itself: a check that never ran, reading as passed."""
    from siesta_dmguess.bench import summarize_trajectory, trajectory_markdown

    def run(energy, guess, read=True):
        return {"guess": guess, "scf_iterations": 5, "siesta_wall_s": 1.0, "prediction_s": 0.0,
                "total_energy_eV": energy, "converged": True, "dm_read": read}

    rows = [{"frame": t, "extrapolation": run(-465.0, "extrapolation" if t else "atomic", read=t > 0),
             "reuse": run(-465.0 + 2e-5 * t, "reuse" if t else "atomic", read=t != 2)} for t in range(3)]
    report = summarize_trajectory(rows, ("extrapolation", "reuse"), "water", "md.traj") | {"name": "md"}
    assert report["energy_reference"] == "extrapolation"
    assert report["max_abs_energy_difference_eV"] == {"extrapolation": None, "reuse": pytest.approx(4e-5)}
    table = trajectory_markdown(report)
    assert "max abs(ΔE) vs extrapolation (eV)" in table and "| extrapolation | 15 | - | 3.0 | - |" in table
    # a history guess whose DM SIESTA did not read is named (frame 0 starts from the atomic guess by design)
    assert "**SIESTA did not read the starting DM** in 1 run(s)" in table and "reuse at frame 2." in table
    alone = summarize_trajectory(rows, ("reuse",), "water", "md.traj")
    assert alone["max_abs_energy_difference_eV"] == {"reuse": None}


def test_a_run_with_psml_pseudopotentials_is_prepared_with_them(tmp_path):
    """bench refused a run whose oxygen came as O.psml ("pseudopotential for species 'O' not found"), which
    predict, the runner and the calculator accept."""
    run = water_run(tmp_path / "data" / "0000")
    (run / "O.psf").rename(run / "O.psml")
    fdf = prepare_run(run / "input.fdf", tmp_path / "work", "atomic")
    assert sorted(p.name for p in fdf.parent.glob("*.ps*")) == ["H.psf", "O.psml"]


def test_a_trajectory_whose_fdf_labels_species_otherwise_is_predicted_and_run(tmp_path):
    """An fdf labelling oxygen `Ow` (its files named so) is the model's O along a trajectory too, as for predict
    and a dataset benchmark: it stopped with "no basis for species ['Ow']" after the first prediction."""
    import shutil

    import ase.io

    from siesta_dmguess.bench import run_trajectory_benchmark

    from .conftest import dataset

    src = dataset("h2o")
    run = tmp_path / "run"
    run.mkdir()
    (run / "input.fdf").write_text((src / "0004" / "input.fdf").read_text().replace(" 8 O\n", " 8 Ow\n"))
    shutil.copy(src / "basis" / "O.psf", run / "Ow.psf")
    shutil.copy(src / "basis" / "H.psf", run / "H.psf")
    from siesta_dmguess.structure import read_structure

    atoms = read_structure(run / "input.fdf").atoms
    moved = atoms.copy()
    moved.positions[1] += [0.02, 0.0, 0.0]
    ase.io.write(tmp_path / "md.traj", [atoms, moved])
    # A fake SIESTA: the run's <label>.DM, the starting DM the ml template put there, stands for the converged one.
    report = run_trajectory_benchmark(tmp_path / "md.traj", run / "input.fdf", model="water", out_dir=tmp_path / "out",
                                      guesses=("ml", "ml+residual"), command=str(fake_siesta(tmp_path, GOOD)),
                                      progress=False)
    assert report["frames"] == 2 and all(r["ml"]["dm_read"] is not False for r in report["per_frame"])


def test_a_trajectory_benchmark_run_again_redoes_only_the_runs_its_change_touches(tmp_path):
    """Every frame was run again with every guess when one guess was added or the refinement changed (the frame's
    kept result recorded the whole list of guesses): an added ml+residual cost the atomic, reuse and ml runs again.
    Now each guess's runs are kept apart with what they depend on; a guess built on a history is still run again
    from the first frame of it that is not kept."""
    import ase.io

    from siesta_dmguess.bench import run_trajectory_benchmark, trajectory_markdown
    from siesta_dmguess.structure import read_structure

    from .conftest import dataset

    src = dataset("h2o") / "0004"
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(src / "input.fdf", run / "input.fdf")
    for species in ("O", "H"):
        shutil.copy(src.parent / "basis" / f"{species}.psf", run)
    atoms = read_structure(run / "input.fdf").atoms
    frames = [atoms.copy() for _ in range(3)]
    for t, frame in enumerate(frames):
        frame.positions[1] += [0.01 * t, 0.0, 0.0]
    ase.io.write(tmp_path / "md.traj", frames)
    log = tmp_path / "calls.log"
    script = tmp_path / "siesta_with_dm"  # logs "frame guess"; SIESTA's converged DM stands for every run's
    script.write_text(f"#!{sys.executable}\nimport os, shutil, sys\nsys.stdin.read()\n"
                      f"here = os.path.abspath('.').split(os.sep)\n"
                      f"open({str(log)!r}, 'a').write(here[-3] + ' ' + here[-2] + '\\n')\n"
                      f"os.path.exists('siesta.DM') or shutil.copy({str(src / 'siesta.DM')!r}, 'siesta.DM')\n"
                      f"sys.stdout.write({GOOD!r})\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)

    def bench(guesses, **kwargs):
        start = len(log.read_text().splitlines()) if log.exists() else 0
        report = run_trajectory_benchmark(tmp_path / "md.traj", run / "input.fdf", model="water",
                                          out_dir=tmp_path / "out", guesses=guesses, command=str(script),
                                          progress=False, **kwargs)
        return report, sorted(log.read_text().splitlines()[start:])

    first, runs = bench(("atomic", "reuse", "ml"))
    assert len(runs) == 9 and first["reused"] == []
    added, runs = bench(("atomic", "reuse", "ml", "ml+residual"))
    assert runs == ["0000 ml+residual", "0001 ml+residual", "0002 ml+residual"]
    assert added["reused_runs"] == {"atomic": 3, "reuse": 3, "ml": 3, "ml+residual": 0} and added["reused"] == []
    assert "Runs reused from an earlier run" in trajectory_markdown(added)
    charge, runs = bench(("atomic", "reuse", "ml", "ml+residual"), refine="charge")
    assert runs == sorted(f"{t:04d} {g}" for t in range(3) for g in ("ml", "ml+residual"))
    (tmp_path / "out" / "md" / "0001" / "reuse" / "result.json").unlink()  # as a stop in that run would leave it
    resumed, runs = bench(("atomic", "reuse", "ml", "ml+residual"), refine="charge")
    assert runs == ["0001 reuse", "0002 reuse"]  # frame 2's reuse starts from frame 1's: run again
    assert resumed["reused"] == [0] and resumed["per_frame"][2]["ml"] == charge["per_frame"][2]["ml"]
    again, runs = bench(("atomic", "reuse", "ml", "ml+residual"), refine="charge")
    assert runs == [] and again["reused"] == [0, 1, 2]


def test_a_trajectory_whose_fdf_lacks_a_pseudopotential_is_refused_before_anything_is_written(tmp_path):
    """The missing H.psf was found at the first frame's first run, after the model had loaded and the frame was
    predicted, named as a file under --out (out/md/0000/atomic/H.psf), and left that run's folder behind."""
    import ase.io

    from siesta_dmguess.bench import run_trajectory_benchmark

    run = water_run(tmp_path / "run")
    (run / "H.psf").unlink()
    from .conftest import water_molecule

    ase.io.write(tmp_path / "md.traj", [water_molecule(), water_molecule()])
    log, script = logging_siesta(tmp_path)
    with pytest.raises(InputFileError, match=r"run/H.psf: pseudopotential for species 'H' not found"):
        run_trajectory_benchmark(tmp_path / "md.traj", run / "input.fdf", model="water", out_dir=tmp_path / "out",
                                 guesses=("atomic", "ml"), command=str(script), progress=False)
    assert not (tmp_path / "out").exists() and not log.exists()


def test_a_structure_run_again_forgets_its_kept_result_first(tmp_path, monkeypatch):
    """A rerun (other settings) stopped midway left the earlier run's result.json beside the runs it overwrote;
    a later resume with the first settings took it, and a trajectory rebuilt its history from the stopped run's
    DMs (39 iterations where a fresh run took 34)."""
    import siesta_dmguess.bench as bench
    from siesta_dmguess.bench import RESULT_FILE, run_benchmark, save_kept

    from .conftest import dataset

    kept = tmp_path / "out" / "h2o" / "0004" / RESULT_FILE
    kept.parent.mkdir(parents=True)
    save_kept(kept.parent, {"fdf_sha256": "of another run"}, {"name": "0004"})

    def stopped(*args, **kwargs):
        assert not kept.exists()  # forgotten before any run overwrites what it described
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "bench_structure", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(dataset("h2o"), model="water", out_dir=tmp_path / "out", limit=1, progress=False,
                      command="/bin/true")
    assert not kept.exists()


def test_a_trajectory_table_gives_each_frames_novelty():
    """The dataset report gave each structure's novelty and flag, the trajectory report none: a frame unlike the
    model's data (an extra H, novelty 8.9 against 2.78) took more iterations from the ML guess without a hint."""
    from siesta_dmguess.bench import summarize_trajectory, trajectory_markdown

    def result(guess, iterations):
        return {"guess": guess, "scf_iterations": iterations, "converged": True, "total_energy_eV": -465.0,
                "siesta_wall_s": 1.0, "prediction_s": 0.1}

    rows = [{"frame": 0, "atomic": result("atomic", 10), "ml": result("ml", 4), "novelty": 0.52, "flagged": False},
            {"frame": 1, "atomic": result("atomic", 10), "ml": result("ml", 11), "novelty": 8.93, "flagged": True}]
    table = trajectory_markdown(summarize_trajectory(rows, ("atomic", "ml"), "water", "md.traj"))
    assert "| frame | atomic | ml | novelty |" in table and "| 0 | 10 | 4 | 0.52 |" in table
    assert "| 1 | 10 | 11 | 8.93 (flagged) |" in table and "| **total** | **20** | **15** | |" in table
    assert "Flagged as novel (novelty above the model's flag level): 1 of 2 frames." in table
    for r in rows:  # a report without novelties (no model, or written before them) has no such column
        del r["novelty"], r["flagged"]
    plain = trajectory_markdown(summarize_trajectory(rows, ("atomic", "ml"), "", "md.traj"))
    assert "novelty" not in plain and "| 1 | 10 | 11 |" in plain
