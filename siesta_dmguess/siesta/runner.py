"""Finding and running a SIESTA executable (never built or shipped by this package)."""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputFileError, SiestaError, SiestaNotFoundError
from ..fdf import fdf_words, normalized_fdf_key, species_block, system_label
from .output import SiestaOutput, parse_output


def _ase_config_command() -> str | None:
    """The siesta command from ASE's configuration file (ASE >= 3.23), if any."""
    try:
        from ase.config import cfg

        section = cfg.parser["siesta"] if "siesta" in cfg.parser else None
        return section.get("command") if section is not None else None
    except Exception:  # no ASE config, or an older ASE
        return None


def _is_relative_executable(arg: str) -> bool:
    return "/" in arg and not os.path.isabs(arg) and os.path.isfile(arg) and os.access(arg, os.X_OK)


def find_siesta(command: str | None = None) -> list[str]:
    """The SIESTA command as an argument list.

    Looked up in order: the ``command`` argument, ``$SIESTA_COMMAND``, ASE's
    configuration (``$ASE_SIESTA_COMMAND``, then the ``[siesta]`` section of ASE's
    config file), then ``siesta`` on ``PATH``. ASE-style templates such as
    ``siesta < PREFIX.fdf > PREFIX.out`` are reduced to the executable and its
    arguments: the runner redirects input and output itself.

    The first of these that is set decides: one that names no executable is an error, not a reason to run
    another SIESTA (whose results a benchmark would then file under the wrong binary).
    """
    tried = []
    candidates = [("argument", command), ("SIESTA_COMMAND", os.environ.get("SIESTA_COMMAND")),
                  ("ASE_SIESTA_COMMAND", os.environ.get("ASE_SIESTA_COMMAND")),
                  ("ASE config [siesta] command", _ase_config_command()), ("PATH", "siesta")]
    for where, cmd in candidates:
        if not cmd:
            tried.append(f"{where}: not set")
            continue
        args = _without_redirections(shlex.split(cmd))
        if not args:
            tried.append(f"{where}: empty command {cmd!r}")
            continue
        exe = shutil.which(args[0]) or (args[0] if os.access(args[0], os.X_OK) and Path(args[0]).is_file() else None)
        if exe:  # absolute: SIESTA runs in the run's folder, where a relative ./siesta (or mpirun ... ./siesta) is not
            return [os.path.abspath(exe)] + [os.path.abspath(a) if _is_relative_executable(a) else a for a in args[1:]]
        if where != "PATH":
            raise SiestaNotFoundError(f"the SIESTA command given by {where} ({cmd!r}) is not an executable: "
                                      f"{args[0]!r} is neither a file with execute permission nor found on PATH")
        tried.append(f"{where}: {args[0]!r} is not an executable")
    raise SiestaNotFoundError("no SIESTA executable found; looked at " + "; ".join(tried) +
                              ". Install SIESTA (e.g. the container in integration/) and set SIESTA_COMMAND.")


def _without_redirections(words: list[str]) -> list[str]:
    """A shell command's words without its redirections (``< in.fdf``, ``> out``, ``>out``, ``2>&1``, ASE's
    ``PREFIX`` templates): the runner feeds the fdf and keeps the output itself. A file left in would reach SIESTA
    as an argument, which 4.1 opens as its input (another run's fdf, or none)."""
    kept, skip_next = [], False
    for word in words:
        if skip_next:
            skip_next = False
        elif word.lstrip("0123456789&") in ("<", ">", ">>"):
            skip_next = True  # the file is the next word
        elif word.lstrip("0123456789&")[:1] in ("<", ">") or "PREFIX" in word:
            pass  # '>out', '2>&1', '<PREFIX.fdf'
        else:
            kept.append(word)
    return kept


@dataclass
class SiestaRun:
    output: SiestaOutput
    wall_s: float
    workdir: Path
    out_file: Path
    returncode: int


def fdf_value(fdf: Path, key: str, default: str | None = None) -> str | None:
    """A top-level fdf value (fdf keys ignore case, '.', '_' and '-')."""
    want = normalized_fdf_key(key)
    for line in Path(fdf).read_text().splitlines():
        parts = fdf_words(line)
        if len(parts) >= 2 and normalized_fdf_key(parts[0]) == want:
            return " ".join(parts[1:])
    return default


def species_labels(fdf: Path) -> list[str]:
    """Labels of the ChemicalSpeciesLabel block, in species-index order."""
    return [label for _, _, label in species_block(Path(fdf).read_text())]


def pseudopotential_dirs(fdf: Path) -> list[Path]:
    """Where a SIESTA run of ``fdf`` looks for its pseudopotentials: its folder, and ``Pseudo.Directory``."""
    folder = Path(fdf).parent
    pseudo_dir = fdf_value(fdf, "Pseudo.Directory")
    return [folder] + ([folder / pseudo_dir] if pseudo_dir else [])


PSEUDO_SUFFIXES = (".psf", ".psml")  # the pseudopotential files SIESTA reads for a species, in its order


def find_pseudopotential(label: str, dirs, suffixes=PSEUDO_SUFFIXES) -> Path | None:
    """The first ``<label><suffix>`` file in ``dirs`` (each folder tried with every suffix, in order), or None."""
    return next((Path(d) / f"{label}{ext}" for d in dirs for ext in suffixes if (Path(d) / f"{label}{ext}").is_file()),
                None)


def check_pseudopotentials(fdf: Path) -> None:
    """Every species needs a .psf/.psml (or a ready .ion basis) next to the fdf or in Pseudo.Directory."""
    folder = Path(fdf).parent
    dirs = pseudopotential_dirs(fdf)
    missing = []
    for label in species_labels(fdf):
        # SIESTA 4.1 reads <label>.vps (unformatted) before <label>.psf (pseudopotential.f)
        candidates = [d / f"{label}{ext}" for d in dirs
                      for ext in (".vps", ".psf", ".psml", ".ion", ".ion.xml", ".ion.nc")]
        if any(c.is_file() for c in candidates):
            continue
        # ASE links every species' file into the run folder, even one it did not find (it then links the
        # .psml name): a dangling link is a missing pseudopotential, said here instead of as SIESTA's abort.
        dangling = [c for c in candidates if c.is_symlink()]
        if dangling:
            raise InputFileError(f"pseudopotential for species {label!r} not found: {dangling[0].name} links to "
                                 f"{os.readlink(dangling[0])}, which does not exist", dangling[0])
        missing.append(label)
    if missing:  # every one named at once: a folder copied without its pseudopotentials lacks them all
        files = ", ".join(f"{label}.psf" for label in missing)
        raise InputFileError(f"pseudopotential{'s' if len(missing) > 1 else ''} {files} (or .psml, or a basis "
                             f"{missing[0]}.ion*) for species {', '.join(map(repr, missing))} not found next to the "
                             f"fdf" + (" nor in Pseudo.Directory" if len(dirs) > 1 else ""),
                             folder / f"{missing[0]}.psf")


def _printable(text: str, width: int = 200) -> str:
    """SIESTA's last lines as a terminal can show them: other bytes than text (a crashed or wrong program's) as
    '?', each line cut at ``width`` characters."""
    lines = ("".join(c if c.isprintable() or c == "\t" else "?" for c in line) for line in text.splitlines())
    return "\n".join(line if len(line) <= width else line[:width] + "..." for line in lines)


def run_siesta(fdf: str | Path, command: str | None = None, timeout: float | None = None,
               allow_unconverged: bool = False) -> SiestaRun:
    """Run SIESTA on ``fdf`` in its folder (stdin = fdf, stdout = ``<SystemLabel>.out``) and parse the output.

    Raises :class:`SiestaError` (with the output file and its last lines) when
    SIESTA exits with an error, crashes, or does not converge (unless
    ``allow_unconverged``).
    """
    fdf = Path(fdf)
    if not fdf.is_file():
        raise InputFileError("fdf file not found", fdf)
    check_pseudopotentials(fdf)
    exe = find_siesta(command)
    label = system_label(fdf)
    out_file = fdf.parent / f"{label}.out"
    t0 = time.perf_counter()
    with open(fdf) as stdin, open(out_file, "w") as stdout:
        try:
            proc = subprocess.run(exe, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, cwd=fdf.parent,
                                  timeout=timeout, text=True, errors="replace")
        except subprocess.TimeoutExpired as exc:
            raise SiestaError(f"SIESTA did not finish within {timeout} s", out_file) from exc
    wall = time.perf_counter() - t0
    output = parse_output(out_file)
    tail = _printable("\n".join(out_file.read_text(errors="replace").splitlines()[-8:]
                                + (proc.stderr or "").splitlines()[-4:]))
    if proc.returncode != 0 or not output.job_completed and not output.converged:
        said = f"; last lines:\n{tail}" if tail.strip() else " and printed nothing (is the command SIESTA?)"
        stopped = "failed" if proc.returncode != 0 else "stopped before 'Job completed'"
        raise SiestaError(f"SIESTA {stopped} (exit status {proc.returncode}){said}", out_file)
    if not output.converged and not allow_unconverged:
        raise SiestaError(f"SCF did not converge after {output.scf_iterations} iterations", out_file)
    energy = output.total_energy_eV
    if output.converged and (not output.scf_iterations or energy is None or not math.isfinite(energy)):
        # SIESTA itself never writes this: a wrapper or a broken build, whose run must not count as a result
        raise SiestaError("the output says the SCF converged but holds no scf: lines or no finite total energy; "
                          f"last lines:\n{tail}", out_file)
    return SiestaRun(output, wall, fdf.parent, out_file, proc.returncode)
