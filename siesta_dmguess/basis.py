"""SIESTA basis sets: per-species orbital tables read through sisl, and their hashes.

A :class:`SpeciesBasis` is everything the rest of the package needs to know about
one species' numerical atomic orbitals: the shells (n, l, zeta, polarization),
the reference occupations q0 (SIESTA's atomic guess), the orbital cutoff radii
and the Kleinman-Bylander projector radii (which widen SIESTA's sparsity pattern).
Radii are stored in Å, as sisl reports them.
"""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import InputFileError

BOHR_TO_ANG = 0.529177210903


@dataclass(frozen=True)
class Shell:
    """One radial function times the 2l+1 real spherical harmonics of angular momentum l."""

    n: int
    l: int
    zeta: int
    polarization: bool
    q0: float  # reference occupation of the whole shell (sum over m)
    radius: float  # cutoff radius in Å

    @property
    def size(self) -> int:
        return 2 * self.l + 1


@dataclass(frozen=True)
class SpeciesBasis:
    """The basis of one species as SIESTA generated it."""

    symbol: str
    Z: int
    shells: tuple[Shell, ...]
    kb_radii: tuple[float, ...] = ()  # KB projector cutoffs in Å
    valence: float = 0.0
    mass: float = 0.0
    # Digest of the radial functions sampled on a fixed grid: two bases with the same
    # shells but different PAO shapes (other energy shift, other pseudopotential) differ.
    radial_digest: str = ""
    # Per shell, R(r) (Å^-3/2, normalized: int R^2 r^2 dr = 1) on RADIAL_POINTS uniform points of [0, radius]:
    # the model carries its basis' orbitals so that S can be computed without the .ion files.
    radial_tables: tuple = field(default=(), compare=False, repr=False)
    source: str = field(default="", compare=False)

    @property
    def norb(self) -> int:
        return sum(s.size for s in self.shells)

    @property
    def orbital_l(self) -> np.ndarray:
        """Angular momentum of every orbital, in SIESTA's order."""
        return np.concatenate([[s.l] * s.size for s in self.shells]).astype(np.int64)

    @property
    def orbital_m(self) -> np.ndarray:
        return np.concatenate([np.arange(-s.l, s.l + 1) for s in self.shells]).astype(np.int64)

    @property
    def orbital_q0(self) -> np.ndarray:
        """Per-orbital reference occupation: the diagonal of SIESTA's atomic-guess DM."""
        return np.concatenate([[s.q0 / s.size] * s.size for s in self.shells])

    @property
    def orbital_radius(self) -> np.ndarray:
        """Cutoff radius (Å) of every orbital, in SIESTA's order."""
        return np.concatenate([[s.radius] * s.size for s in self.shells])

    @property
    def max_radius(self) -> float:
        return max(s.radius for s in self.shells)

    @property
    def max_kb_radius(self) -> float:
        return max(self.kb_radii, default=0.0)

    @property
    def q0_total(self) -> float:
        return float(sum(s.q0 for s in self.shells))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        d["hash"] = self.hash
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SpeciesBasis":
        d = dict(d)
        d.pop("hash", None)
        d["shells"] = tuple(Shell(**s) for s in d["shells"])
        d["kb_radii"] = tuple(d.get("kb_radii", ()))
        d["radial_tables"] = tuple(tuple(t) for t in d.get("radial_tables", ()))
        return cls(**d)

    @cached_property
    def hash(self) -> str:
        """Stable sha256 of the basis: species, shells, radii (1e-5 Å) and radial shapes."""
        payload = {
            "symbol": self.symbol,
            "Z": self.Z,
            "valence": round(self.valence, 6),
            "shells": [
                [s.n, s.l, s.zeta, bool(s.polarization), round(s.q0, 6), round(s.radius, 5)]
                for s in self.shells
            ],
            "kb_radii": [round(r, 5) for r in self.kb_radii],
            "radial_digest": self.radial_digest,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def same_orbitals(self, other: "SpeciesBasis") -> bool:
        """The same basis whatever each species is called: the label is part of :attr:`hash`, but ASE's ``Siesta``
        names the species of a run ``O.1``, ``H.2`` (and SIESTA its .ion.xml files so) where a model says ``O``."""
        return replace(self, symbol=other.symbol).hash == other.hash

    def sisl_atom(self):
        """A sisl.Atom with this basis' orbitals (SIESTA order), for building geometries."""
        import sisl

        orbitals = []
        for s in self.shells:
            for m in range(-s.l, s.l + 1):
                orbitals.append(
                    sisl.AtomicOrbital(
                        n=s.n, l=s.l, m=m, zeta=s.zeta, P=s.polarization, R=s.radius, q0=s.q0 / s.size
                    )
                )
        return sisl.Atom(self.Z, orbitals=orbitals, mass=self.mass or None, tag=self.symbol)

    def describe(self) -> str:
        """Short human-readable shell list, e.g. 'O: 2s 2s 2p 2p 3d* (13 orbitals)'."""
        shells = " ".join(f"{s.n}{'spdf'[s.l]}{'*' if s.polarization else ''}" for s in self.shells)
        return f"{self.symbol}: {shells} ({self.norb} orbitals, rc <= {self.max_radius:.3f} Å)"


RADIAL_POINTS = 400


def _radial_tables(orbitals) -> tuple:
    """Every shell's radial function on RADIAL_POINTS uniform points of [0, R] (8 significant digits)."""
    tables = []
    for orb in orbitals:
        if orb.m != -orb.l:
            continue
        r = np.linspace(0.0, orb.R, RADIAL_POINTS)
        tables.append(tuple(float(f"{v:.8g}") for v in np.asarray(orb.orb.radial(r), dtype=float)))
    return tuple(tables)


def _radial_digest(orbitals) -> str:
    """Digest of every shell's radial function sampled on 32 points of [0, R]."""
    samples = []
    for orb in orbitals:
        if orb.m != -orb.l:  # one sample per shell
            continue
        r = np.linspace(0.0, orb.R, 32)
        radial = np.asarray(orb.orb.radial(r)) if hasattr(orb, "orb") else np.zeros_like(r)
        samples.append(np.round(radial, 4).tolist())
    return hashlib.sha256(json.dumps(samples).encode()).hexdigest()[:16]


def _kb_radii_from_ion_xml(path: Path) -> tuple[float, ...]:
    # sisl reads the PAOs of an .ion.xml but not its KB projectors, whose radii
    # decide which far-apart orbital pairs SIESTA keeps in its sparsity pattern.
    root = ET.parse(path).getroot()
    radii = []
    for proj in root.iter("projector"):
        cutoff = proj.find("radfunc/cutoff")
        if cutoff is not None:
            radii.append(float(cutoff.text) * BOHR_TO_ANG)
    return tuple(radii)


def _ion_xml_scalar(path: Path, tag: str, default: float = 0.0) -> float:
    node = ET.parse(path).getroot().find(tag)
    return float(node.text) if node is not None and node.text else default


def read_species_basis(path: str | Path) -> SpeciesBasis:
    """Read one species' basis from a SIESTA ``.ion.xml`` or ``.ion.nc`` file (through sisl)."""
    import sisl

    path = Path(path)
    if not path.is_file():
        raise InputFileError("basis file not found", path)
    try:
        atom = sisl.get_sile(str(path)).read_basis()
    except Exception as exc:  # sisl raises many kinds for corrupt files
        raise InputFileError(f"cannot read the SIESTA basis ({type(exc).__name__}: {exc})", path) from exc
    if atom is None or len(atom.orbitals) == 0:
        raise InputFileError("the file holds no orbitals", path)
    shells = []
    for orb in atom.orbitals:
        if orb.m != -orb.l:  # sisl lists every m; a shell starts at m = -l
            continue
        sph_q0 = getattr(orb.orb, "q0", None) if hasattr(orb, "orb") else None
        shell_q0 = float(sph_q0) if sph_q0 is not None else float(orb.q0) * (2 * orb.l + 1)
        shells.append(Shell(n=int(orb.n), l=int(orb.l), zeta=int(orb.zeta), polarization=bool(orb.P),
                            q0=shell_q0, radius=float(orb.R)))
    kb, valence = (), 0.0
    if path.name.endswith(".xml"):
        kb = _kb_radii_from_ion_xml(path)
        valence = _ion_xml_scalar(path, "valence")
    symbol = str(atom.tag) if atom.tag else atom.symbol
    return SpeciesBasis(symbol=symbol, Z=int(atom.Z), shells=tuple(shells), kb_radii=kb,
                        valence=valence or sum(s.q0 for s in shells), mass=float(atom.mass),
                        radial_digest=_radial_digest(atom.orbitals), radial_tables=_radial_tables(atom.orbitals),
                        source=str(path))


def atom_radii(labels, basis: dict[str, SpeciesBasis]) -> tuple[np.ndarray, np.ndarray]:
    """Each atom's largest orbital radius and largest KB-projector radius (Å), for a structure's species labels:
    the radii SIESTA's sparsity rule uses (graph.pattern_pairs, dm.siesta_orbital_mask)."""
    return (np.array([basis[l].max_radius for l in labels], dtype=float),
            np.array([basis[l].max_kb_radius for l in labels], dtype=float))


def find_basis_files(folder: str | Path, labels) -> dict[str, Path]:
    """Locate ``<label>.ion.xml`` (or ``.ion.nc``) for each species label in ``folder``."""
    folder = Path(folder)
    found = {}
    for label in labels:
        for ext in (".ion.xml", ".ion.nc"):
            cand = folder / f"{label}{ext}"
            if cand.is_file():
                found[label] = cand
                break
    return found


def read_basis_folder(folder: str | Path, labels) -> dict[str, SpeciesBasis]:
    """Read the basis of every label from a folder; error naming the first missing file."""
    files = find_basis_files(folder, labels)
    missing = [l for l in labels if l not in files]
    if missing:
        raise InputFileError(f"no basis file for species {missing} (expected {missing[0]}.ion.xml)", folder)
    return {label: read_species_basis(p) for label, p in files.items()}
