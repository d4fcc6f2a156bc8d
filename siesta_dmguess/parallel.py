"""Per-structure work shared over MPI ranks (the optional ``mpi`` extra: ``pip install ".[mpi]"``, mpi4py).

``mpirun -n 8 siesta-dmguess predict runs/*/ --model water`` gives each of the 8 processes every 8th structure.
Each loads the model once and writes the DMs of its own structures, so nothing has to be gathered and no two
processes write the same file. A process started without an MPI launcher is rank 0 of 1 and does everything;
mpi4py is then not even imported (on some clusters initializing MPI outside a launcher fails).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import DMGuessError

# World sizes as MPI launchers export them: Open MPI, MPICH / Intel MPI (Hydra, PMI), MVAPICH2, Slurm's srun.
# They say whether this process is one of several before MPI is initialized.
LAUNCHER_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one command."""

    rank: int = 0
    size: int = 1
    ranks_on_node: int = 1  # processes sharing this machine's cores

    def share(self, items: list) -> list:
        """This rank's items: every ``size``-th, starting at ``rank`` (round robin, so that runs of large and
        small structures, as folder listings tend to hold, spread evenly)."""
        return list(items)[self.rank::self.size]

    def threads(self) -> int:
        """torch threads that keep this node's ranks on separate cores (0: torch's default, for one process):
        the node's cores split between its ranks, and no more than the cores the launcher bound this one to."""
        if self.size == 1:
            return 0
        cores = os.cpu_count() or 1
        bound = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
        return max(1, min(bound, cores // self.ranks_on_node))


def launcher_size(environ=os.environ) -> int:
    """The number of processes an MPI launcher started, from its environment (1 without a launcher)."""
    for name in LAUNCHER_SIZE_VARIABLES:
        try:
            return max(1, int(environ[name]))
        except (KeyError, ValueError):
            continue
    return 1


def mpi_world(environ=os.environ) -> World:
    """This process's :class:`World`: from mpi4py where an MPI launcher started several processes, else one.

    Under a launcher with several processes but without mpi4py, every process would predict and write every DM
    (each moving the others' files to backups), so that is an error that says how to fix it.
    """
    size = launcher_size(environ)
    if size == 1:
        return World()
    try:
        from mpi4py import MPI
    except ImportError:
        raise DMGuessError(f"an MPI launcher started {size} processes, but mpi4py is not installed, so each would "
                           "predict every structure and write every DM: install the mpi extra (pip install "
                           "'siesta_dmguess[mpi]'), or run one process") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != size:  # e.g. mpi4py built for another MPI: each process would be a world of its own
        raise DMGuessError(f"an MPI launcher started {size} processes, but mpi4py sees {comm.Get_size()}: it was "
                           "built for another MPI library than the launcher's (reinstall mpi4py against the MPI "
                           "of your mpirun), and each process would predict every structure")
    return World(comm.Get_rank(), comm.Get_size(), comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size())
