"""predict under an MPI launcher: each process predicts and writes only its share of the structures."""

import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from siesta_dmguess.card import save_model
from siesta_dmguess.cli import main
from siesta_dmguess.errors import DMGuessError
from siesta_dmguess.model import DensityMatrixModel
from siesta_dmguess.parallel import World, launcher_size, mpi_world

from .conftest import small_config, water_molecule


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny-water"
    save_model(DensityMatrixModel(small_config()), out, {"name": "tiny-water"})
    return out


@pytest.fixture
def structures(tmp_path):
    paths = []
    for k in range(5):
        path = tmp_path / f"w{k}.xyz"
        water_molecule(np.random.default_rng(k)).write(path)
        paths.append(path)
    return paths


def fake_mpi4py(monkeypatch, rank: int, size: int) -> None:
    """An mpi4py whose COMM_WORLD says this process is ``rank`` of ``size``, all on one machine."""
    comm = types.SimpleNamespace(Get_rank=lambda: rank, Get_size=lambda: size,
                                 Split_type=lambda kind: types.SimpleNamespace(Get_size=lambda: size))
    mpi = types.SimpleNamespace(COMM_WORLD=comm, COMM_TYPE_SHARED=1)
    package = types.ModuleType("mpi4py")
    package.MPI = mpi
    monkeypatch.setitem(sys.modules, "mpi4py", package)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)


def test_each_rank_predicts_its_round_robin_share(model_dir, structures, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    fake_mpi4py(monkeypatch, rank=1, size=2)
    assert main(["predict", *map(str, structures), "--model", str(model_dir)]) == 0
    written = [p.with_suffix(".DM").is_file() for p in structures]
    assert written == [False, True, False, True, False]  # rank 1 of 2: the 2nd and 4th


def test_several_processes_without_mpi4py_is_an_error_that_says_how_to_fix_it(model_dir, structures, monkeypatch,
                                                                              capsys):
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails
    assert main(["predict", *map(str, structures), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "4 processes" in err and "mpi4py is not installed" in err and "siesta_dmguess[mpi]" in err
    assert not any(p.with_suffix(".DM").exists() for p in structures)  # nothing half-done


def test_an_mpi4py_that_sees_another_world_than_the_launcher_is_an_error(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    fake_mpi4py(monkeypatch, rank=0, size=1)  # mpi4py built for another MPI: a singleton world per process
    with pytest.raises(DMGuessError, match="launcher started 2 processes, but mpi4py sees 1"):
        mpi_world()


def test_one_process_does_everything_without_importing_mpi4py(monkeypatch):
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # would raise if imported
    assert mpi_world() == World(0, 1, 1)
    assert launcher_size({"SLURM_STEP_NUM_TASKS": "1"}) == 1
    assert launcher_size({"PMI_SIZE": "not a number", "SLURM_STEP_NUM_TASKS": "3"}) == 3


def test_share_covers_every_item_once_and_ranks_split_the_cores(monkeypatch):
    items = list(range(11))
    shares = [World(r, 4, 4).share(items) for r in range(4)]
    assert sorted(x for s in shares for x in s) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)  # not bound
    assert World(0, 4, 4).threads() == 2 and World(0, 16, 16).threads() == 1 and World().threads() == 0
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {3}, raising=False)  # bound to one core by mpirun
    assert World(0, 4, 4).threads() == 1


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (an MPI installation) on this machine")
def test_mpirun_two_processes_write_every_dm_once(model_dir, structures):
    pytest.importorskip("mpi4py", reason="mpi4py (the mpi extra) is not installed")
    cmd = ["mpirun", "-n", "2", "--oversubscribe"] + (["--allow-run-as-root"] if _is_root() else []) + \
        [sys.executable, "-m", "siesta_dmguess.cli", "predict", *map(str, structures), "--model", str(model_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if "--oversubscribe" in done.stderr and done.returncode:  # an MPI other than Open MPI
        pytest.skip(f"this mpirun does not take Open MPI's options: {done.stderr[:200]}")
    assert done.returncode == 0, done.stderr
    assert all(p.with_suffix(".DM").is_file() for p in structures)
    assert not any(p.with_suffix(".DM.bak").exists() for p in structures)  # no rank wrote another's file
    assert done.stdout.count(".DM:") == len(structures)


def _is_root() -> bool:
    import os

    return hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.parametrize("command", [["train", "data", "--out", "m"], ["evaluate", "water", "data"],
                                     ["bench", "data"]])
def test_commands_that_do_not_share_their_work_refuse_to_run_under_mpirun(command, monkeypatch, capsys):
    monkeypatch.setenv("PMI_SIZE", "3")
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "3 processes" in err and f"'{command[0]}' does not share its work" in err
    assert ("SIESTA_COMMAND" in err) == (command[0] == "bench")


def test_structure_files_are_read_by_each_rank_itself(tmp_path, monkeypatch):
    """Under mpirun ASE reads a file on rank 0 and hands every rank that (its `parallel=True` default), so each
    rank predicted rank 0's structure under its own file's name (`mpirun -n 2 siesta-dmguess predict a.xyz b.xyz`
    wrote b.DM equal to a.DM) and an fdf on rank 0 beside an .xyz on rank 1 hung. Each rank reads its own files."""
    import ase.io

    from siesta_dmguess.structure import read_structure

    from .conftest import water_molecule

    calls = []
    read = ase.io.read
    monkeypatch.setattr(ase.io, "read", lambda *args, **kwargs: calls.append(kwargs) or read(*args, **kwargs))
    water_molecule().write(tmp_path / "a.xyz")
    read_structure(tmp_path / "a.xyz")
    assert calls and all(kwargs.get("parallel") is False for kwargs in calls)
