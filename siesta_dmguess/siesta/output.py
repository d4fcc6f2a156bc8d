"""Parsing SIESTA's standard output: SCF history, DM restart, convergence, energies, timing."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

# "   scf:    3     -465.688652     -465.669509     -465.669509  0.029728 -2.552361  0.329929"
_SCF = re.compile(r"^ *scf: *\d+ .*$", re.M)
# SIESTA 4.1 writes that line as '(a8,i4,3f16.6,3f10.6)' (write_subs.F): fixed fields, which touch where a value
# fills its field, e.g. a Fermi level below -10 eV ("0.000077-12.131650"). Split at the fields, not at blanks.
_SCF_FIELDS = (4, 16, 16, 16, 10, 10, 10)
_TOTAL = re.compile(r"^siesta:\s+Total =\s+(\S+)", re.M)
_FERMI = re.compile(r"^siesta:\s+Fermi =\s+(\S+)", re.M)
_EBS = re.compile(r"^siesta:\s+Ebs\s+=\s+(\S+)", re.M)
_WALL = re.compile(r"Elapsed wall time \(sec\) =\s+(\S+)")
_VERSION = re.compile(r"Siesta Version\s*:\s*(\S+)")
_START_Q = re.compile(r"For starting DM, Qtot, Tr\[D\*S\] =\s+(\S+)\s+(\S+)")
_DM_TOLERANCE = re.compile(r"^redata: DM tolerance for SCF\s*=\s*(\S+)", re.M)
_DM_READ = re.compile(r"Attempting to read DM from file\.\.\.\s*(Succeeded|Failed)")


@dataclass(frozen=True)
class ScfStep:
    iscf: int
    e_harris_eV: float
    e_ks_eV: float
    free_energy_eV: float
    dDmax: float
    ef_eV: float
    dHmax_eV: float


@dataclass(frozen=True)
class SiestaOutput:
    """What one SIESTA run printed. ``scf_*`` refer to the last SCF cycle (geometry step)."""

    scf_history: list[ScfStep] = field(default_factory=list)
    scf_histories: list[list[ScfStep]] = field(default_factory=list)  # one per geometry step
    dm_read_from_file: bool = False
    converged: bool = False
    total_energy_eV: float | None = None
    fermi_eV: float | None = None
    band_energy_eV: float | None = None  # "Ebs", the band-structure energy Tr(D H), printed after the SCF
    wall_s: float | None = None
    version: str | None = None
    job_completed: bool = False
    # Electrons of the starting DM, Tr[D S], and the neutral count Qtot: a predicted DM's charge error.
    start_dm_electrons: float | None = None
    electrons: float | None = None
    dm_tolerance: float | None = None  # DM.Tolerance as SIESTA echoed it: the dDmax at which the SCF stops

    @property
    def scf_iterations(self) -> int:
        return len(self.scf_history)

    @property
    def scf_iterations_per_step(self) -> list[int]:
        return [len(h) for h in self.scf_histories]


def _float(text: str) -> float:
    try:
        return float(text.replace("D", "E"))
    except ValueError:
        return float("nan")


def _scf_step(line: str) -> ScfStep | None:
    """One ``scf:`` line, read by SIESTA's fixed fields, else (another layout) by blanks; None if neither gives
    an iteration number and six values (a value that overflowed its field, '*****', reads as NaN)."""
    def numbers(values):
        if len(values) != 7 or not values[0].strip().isdigit():
            return None
        out = []
        for v in (v.strip() for v in values[1:]):
            if v and set(v) == {"*"}:
                out.append(float("nan"))
                continue
            try:
                out.append(float(v.replace("D", "E")))
            except ValueError:
                return None
        return ScfStep(int(values[0]), *out)

    start = line.index("scf:") + 5  # the end of SIESTA's a8 field "   scf: "
    bounds = [start + sum(_SCF_FIELDS[:k]) for k in range(len(_SCF_FIELDS) + 1)]
    fields = [line[a:b] for a, b in zip(bounds, bounds[1:])]
    return numbers(fields) or numbers(line[start:].split()[:7])


def _read_text(path: Path) -> str:
    """A SIESTA output's text, plain or gzipped; of a truncated or corrupt ``.gz`` (a copy cut short), what could
    be decompressed, as of a plain output cut short."""
    if path.suffix != ".gz":
        return path.read_text(errors="replace")
    # zlib rather than gzip.open: gzip drops the last chunk it decompressed when the stream ends early.
    raw, text = path.read_bytes(), b""
    while raw:
        stream = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
        try:
            text += stream.decompress(raw)
        except zlib.error:  # not gzip data (from here on)
            break
        raw = stream.unused_data  # a next gzip member, if any
    return text.decode(errors="replace")


def parse_output(source: str | Path) -> SiestaOutput:
    """Parse a SIESTA output given as a path (plain or ``.gz``) or as its text.

    Robust to truncated outputs (a crash): whatever was printed is returned, and
    ``converged`` is False unless SIESTA said the SCF converged.
    """
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and len(source) < 4096):
        text = _read_text(Path(source))
    else:
        text = source
    histories: list[list[ScfStep]] = []
    after_scf = 0  # where the last SCF line ends: SIESTA also prints an Ebs for the starting DM, before the SCF
    for m in _SCF.finditer(text):
        step = _scf_step(m.group(0))
        if step is None:
            continue
        after_scf = m.end()
        if step.iscf == 1 or not histories:
            histories.append([])
        histories[-1].append(step)
    dm_reads = _DM_READ.findall(text)
    converged = ("SCF cycle converged" in text or "SCF Convergence reached" in text) and \
        "SCF_NOT_CONV" not in text and "SCF did not converge" not in text
    total = _TOTAL.findall(text)
    fermi = _FERMI.findall(text)
    ebs = _EBS.findall(text, after_scf) if after_scf else []
    wall = _WALL.findall(text)
    version = _VERSION.search(text)
    last = histories[-1] if histories else []
    start_q = _START_Q.findall(text)
    tolerance = _DM_TOLERANCE.search(text)
    return SiestaOutput(
        scf_history=last, scf_histories=histories,
        dm_read_from_file=bool(dm_reads) and dm_reads[0] == "Succeeded",
        converged=converged,
        total_energy_eV=_float(total[-1]) if total else (last[-1].e_ks_eV if last else None),
        fermi_eV=_float(fermi[-1]) if fermi else None,
        band_energy_eV=_float(ebs[-1]) if ebs else None,
        wall_s=_float(wall[-1]) if wall else None,
        version=version.group(1) if version else None,
        job_completed="Job completed" in text,
        start_dm_electrons=_float(start_q[0][1]) if start_q else None,
        electrons=_float(start_q[0][0]) if start_q else None,
        # printed with 6 decimals: a tolerance below 5e-7 reads as 0, which says nothing
        dm_tolerance=(_float(tolerance.group(1)) or None) if tolerance else None,
    )
