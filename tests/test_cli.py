"""The command line's own options (each subcommand is tested with the function it wraps)."""

from importlib.metadata import version

import pytest

from siesta_dmguess import __version__
from siesta_dmguess.cli import main


def test_version_names_the_package_and_its_stack(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    # pyproject takes the version from __version__, so the installed distribution must carry the same one.
    assert version("siesta_dmguess") == __version__
    assert printed.startswith(f"siesta-dmguess {__version__} ")
    for name in ("torch", "e3nn", "sisl", "ase", "numpy"):
        assert f"{name} {version(name)}" in printed


def test_python_dash_m_runs_the_same_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "siesta_dmguess", "predict", "no-such-file.xyz", "--model", "water"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("siesta-dmguess: error: no-such-file.xyz") and "Traceback" not in done.stderr


def test_verbose_predict_shows_no_line_of_sisls_file_handling(tmp_path, caplog):
    """The package's fdf sile is a subclass of sisl's, and sisl names a sile's logger after its class's module: under
    -v, 91 lines of sisl's "opening filehandle" for one water molecule (and none of the package's)."""
    from .conftest import water_molecule

    fdf = tmp_path / "water.fdf"
    fdf.write_text("SystemLabel water\nNumberOfSpecies 2\n%block ChemicalSpeciesLabel\n 1 8 O\n 2 1 H\n"
                   "%endblock ChemicalSpeciesLabel\nLatticeConstant 1.0 Ang\n%block LatticeVectors\n 12 0 0\n 0 12 0\n"
                   " 0 0 12\n%endblock LatticeVectors\nAtomicCoordinatesFormat Ang\n"
                   "%block AtomicCoordinatesAndAtomicSpecies\n" + "".join(
                       f" {x:.5f} {y:.5f} {z:.5f} {1 if n == 8 else 2}\n"
                       for (x, y, z), n in zip(water_molecule().positions, water_molecule().numbers))
                   + "%endblock AtomicCoordinatesAndAtomicSpecies\n")
    assert main(["predict", str(fdf), "--model", "water", "-o", str(tmp_path / "w.DM"), "-v", "--threads", "1"]) == 0
    sisls = [r.name for r in caplog.records if "filehandle" in r.getMessage()]
    assert not sisls, sisls[:3]


@pytest.mark.parametrize("argv", [["-v", "models"], ["models", "-v"], ["models"]])
def test_verbose_before_or_after_the_command_logs_this_package_only(argv, capsys):
    """`predict -v` was refused (the option was the top level's only), and `-v` set the root logger to DEBUG:
    sisl's own debug lines, hundreds per structure, buried the package's."""
    import logging

    package, root = logging.getLogger("siesta_dmguess"), logging.getLogger()
    before = package.level, root.level
    try:
        seen = []
        import siesta_dmguess.cli as cli

        real = cli._cmd_models
        cli._cmd_models = lambda args: seen.append(package.level) or real(args)
        try:
            assert main(argv) == 0
        finally:
            cli._cmd_models = real
        assert (seen == [logging.DEBUG]) == ("-v" in argv)
        assert package.level == before[0]  # for that command only
        assert not logging.getLogger("sisl").isEnabledFor(logging.DEBUG)
    finally:
        package.setLevel(before[0])
        root.setLevel(before[1])
    assert "water" in capsys.readouterr().out


@pytest.mark.parametrize("epochs, said", [(2, "its checkpoint had finished all 2 epochs: nothing more was trained"),
                                          (5, "a stopped training continued from its checkpoint after 2 epochs")])
def test_train_run_again_says_whether_it_trained_on(monkeypatch, tmp_path, capsys, epochs, said):
    """`train` run again on a finished model said "a stopped training continued from its checkpoint" though nothing
    had stopped and no epoch ran."""
    from types import SimpleNamespace

    import siesta_dmguess.train as train_module

    monkeypatch.setattr(train_module, "train", lambda *args, **kwargs: SimpleNamespace(
        out_dir=tmp_path / "m", resumed_at_epoch=2, validation={}))
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "m"), "--epochs", str(epochs)]) == 0
    assert said in capsys.readouterr().out
