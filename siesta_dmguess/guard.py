"""The guard: whether a model may predict the DM of a run, before it does.

:func:`check_compatibility` compares what can be known about a run with the model card: species (by label, else
element), the basis in any ``.ion.xml`` next to an fdf (hash of shells, cutoffs and radial shapes, whatever the
species is called), the fdf's XC, spin and basis settings (:func:`setting_problems`: every option that shapes the
basis, each missing one read as SIESTA's default) and the pseudopotential checksums. A mismatch is a
:class:`~siesta_dmguess.errors.ModelCompatibilityError` naming the differing item, unless ``force=True`` (logged
as a warning). ``train`` and ``evaluate`` hold their runs to one set of settings the same way
(:func:`check_runs_made_as`). What a prediction itself says about its use (novelty, sampling, occupied space) is
:class:`~siesta_dmguess.predict.Prediction`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .basis import find_basis_files, read_species_basis
from .card import LoadedModel, sha256_file
from .errors import ModelCompatibilityError
from .fdf import FDF_ENERGY_KEYS, normalized_fdf_key
from .structure import Structure, element_symbol

log = logging.getLogger(__name__)


# SIESTA's defaults for the settings a card records (SIESTA manual): a run that leaves one out uses this value, so
# a missing key is compared as the default, on both sides (an fdf without PAO.EnergyShift makes a different basis
# from ASE's Siesta calculator, whose own default energy_shift is 0.1 eV).
SIESTA_DEFAULTS = {"XC.functional": "LDA", "XC.authors": "PZ", "PAO.BasisSize": "DZP", "PAO.EnergyShift": "0.02 Ry"}
# Names of one setting value: SIESTA reads "CA" and "PZ" as the same LDA (Ceperley-Alder, Perdew-Zunger's fit).
SETTING_ALIASES = {"ca": "pz"}


def _normalize_setting(value: str) -> str:
    value = " ".join(str(value).lower().replace("_", ".").split())
    return SETTING_ALIASES.get(value, value)


def _same_setting(key: str, got, expected) -> bool:
    """Whether two values of an fdf setting mean the same. Energies ("<value> Ry", :func:`read_fdf_settings`)
    compare to 1e-3 relative: an energy shift written as 0.2721 eV is SIESTA's 0.02 Ry, not a new basis."""
    if key in FDF_ENERGY_KEYS:
        try:
            return _close(*(float(str(v).split()[0]) for v in (got, expected)))
        except (ValueError, IndexError):
            pass  # not a number: compare as text
    return _normalize_setting(got) == _normalize_setting(expected)


# SIESTA 4.1's spellings of a spin-unpolarized run (m_spin.F90; with three older ones this package took), and the
# words fdf_boolean reads as true ("" is a logical key on its own).
UNPOLARIZED = ("none", "non-polarized", "non-polarised", "np", "n-p", "nonpolarized", "unpolarized")
TRUE_WORDS = ("yes", "true", ".true.", "t", "y", "")


def _spin_setting(settings: dict) -> str:
    """'' for a spin-unpolarized run, else the setting that polarizes it, as SIESTA 4.1 decides (m_spin.F90):
    ``Spin`` where the fdf gives it, else the legacy ``SpinOrbit``, ``NonCollinearSpin`` or ``SpinPolarized``."""
    if "Spin" in settings:
        return "" if str(settings["Spin"]).strip().lower() in UNPOLARIZED else f"Spin {settings['Spin']}"
    for key in ("SpinOrbit", "NonCollinearSpin", "SpinPolarized"):
        if key in settings and str(settings[key]).strip().lower() in TRUE_WORDS:
            return f"{key} T"
    return ""


def _magnetic_file(structure: Structure) -> str:
    """For a structure file (not an fdf) that gives atoms magnetic moments (ASE's initial_magmoms, or the moments
    of a calculation it stores), the words that say so, as :func:`_spin_setting` names a spin setting; else "".
    Such a file is meant for a spin-polarized run, which a predicted DM would start without moments (CH2: the
    singlet, 0.33 eV above the triplet SIESTA finds from its atomic guess). The calculator's atoms are not checked
    here: its own ``spin`` setting decides whether ASE writes their moments."""
    if not structure.source or Path(str(structure.source)).suffix.lower() == ".fdf":
        return ""
    atoms = structure.atoms
    moments = atoms.get_initial_magnetic_moments()
    if not np.any(moments) and atoms.calc is not None and "magmoms" in getattr(atoms.calc, "results", {}):
        moments = np.asarray(atoms.calc.results["magmoms"])
    if not np.any(np.abs(moments) > 1e-8):
        return ""
    return f"magnetic moments (largest {np.abs(moments).max():g})"


def model_species_of_labels(structure: Structure, model_species, model_z: dict | None = None) -> dict[str, str | None]:
    """The model species each of the structure's species labels stands for: the label itself if the model
    has it, else its chemical element (SIESTA labels only name the basis and pseudopotential files, e.g.
    ``Ow`` or ``O_pbe`` for oxygen), else (given each model species' atomic number, ``model_z``) the model's one
    species of that element (a model trained on runs of ASE's ``Siesta``, whose labels are ``O.1``, ``H.2``), or
    None when the model covers none of these. Whether that species' basis is the model's is
    :func:`check_compatibility`'s job."""
    mapping = {}
    for label, z in zip(structure.labels, structure.atoms.numbers):
        if label not in mapping:
            element = element_symbol(int(z))
            same_z = [s for s, sz in (model_z or {}).items() if sz == int(z)]
            mapping[label] = (label if label in model_species else element if element in model_species
                              else same_z[0] if len(same_z) == 1 else None)
    return mapping


def model_species_of(structure: Structure, loaded: LoadedModel) -> dict[str, str | None]:
    """:func:`model_species_of_labels` for a loaded model, which knows its species' atomic numbers."""
    return model_species_of_labels(structure, loaded.config.species,
                                   {s: loaded.basis[s].Z for s in loaded.config.species})


def shipped_models_covering(structure: Structure) -> list[str]:
    """The shipped models whose species cover all of the structure's (by label or chemical element, as
    :func:`model_species_of_labels` maps them), the most specialized first: fewest species, then by name."""
    from .card import list_shipped_models, read_card

    covering = []
    for name in list_shipped_models():
        species = read_card(name).get("species", [])
        if all(s is not None for s in model_species_of_labels(structure, species).values()):
            covering.append((len(species), name))
    return [name for _, name in sorted(covering)]


def ghost_problem(structure: Structure) -> str:
    """What is wrong with a structure's ghost atoms ("" where it has none): no model learns them (``train`` and
    ``evaluate`` refuse runs with them, ``predict`` structures)."""
    ghosts = structure.fdf_settings.get("ghost_species")
    if not ghosts:
        return ""
    return (f"species {ghosts} are ghost atoms (a negative atomic number in ChemicalSpeciesLabel: orbitals without "
            "nucleus or electrons), which no model learns")


def check_compatibility(structure: Structure, loaded: LoadedModel, force: bool = False) -> list[str]:
    """Compare a structure (and its fdf folder) with a model card; error or (force) warnings naming the item."""
    problems = []
    species_of = model_species_of(structure, loaded)
    missing = sorted(label for label, species in species_of.items() if species is None)
    if missing:
        covering = shipped_models_covering(structure)
        hint = f"; shipped models that cover all its species: {', '.join(covering)}" if covering else ""
        problems.append(f"species {missing} are not covered by model {loaded.path.name!r} "
                        f"(model species: {loaded.config.species}){hint}")
    z_of = dict(zip(structure.labels, (int(z) for z in structure.atoms.numbers)))
    for label, species in species_of.items():
        # A label names the basis and pseudopotential; an atomic number that is not the model species' own (a
        # typo, or another element under a label the model knows) is another atom, whose DM the model does not
        # know. Ghost atoms keep their element's number here (sisl reads |Z|): ghost_species flags them.
        if species is not None and z_of[label] != loaded.basis[species].Z:
            problems.append(f"species {label!r} has atomic number {z_of[label]} in the structure, but the model's "
                            f"{species!r} has {loaded.basis[species].Z}")
    if ghosts := ghost_problem(structure):
        problems.append(ghosts)
    spin = _spin_setting(structure.fdf_settings)
    unpolarized = ("the models predict spin-unpolarized DMs only (a start with no spin moment keeps SIESTA from a "
                   "magnetic ground state: docs/conventions.md)")
    if spin:
        problems.append(f"the fdf asks for a {spin} calculation; {unpolarized}")
    elif magnetic := _magnetic_file(structure):
        problems.append(f"the structure file gives its atoms {magnetic}, for a spin-polarized run; {unpolarized}")
    card = loaded.card
    if structure.source and Path(structure.source).suffix.lower() == ".fdf":
        folder = Path(structure.source).parent
        known = {label for label, species in species_of.items() if species is not None}
        for label, path in find_basis_files(folder, known).items():
            b, model_basis = read_species_basis(path), loaded.basis[species_of[label]]
            if b.norb != model_basis.norb:  # no DM of the model's basis fits this run, --force or not
                raise ModelCompatibilityError(
                    f"basis of {label!r} in {path.name} has {b.norb} orbitals, the model's {species_of[label]!r} "
                    f"{model_basis.norb} ({b.describe()} vs {model_basis.describe()}): a DM of the model's basis "
                    f"cannot be read by this run, even with --force", structure.source)
            if not b.same_orbitals(model_basis):
                problems.append(f"basis of {label!r} in {path.name} differs from the model's "
                                f"{species_of[label]!r} ({b.describe()}, hash {b.hash} vs {model_basis.describe()}, "
                                f"hash {model_basis.hash})")
        from .siesta.runner import find_pseudopotential, pseudopotential_dirs

        digests = card.get("pseudopotentials", {})
        dirs = pseudopotential_dirs(Path(structure.source))  # beside the fdf, else in Pseudo.Directory, as SIESTA
        for label in sorted(known):
            # .psf only: the card's checksums are of .psf files (a .psml is another file, not another pseudopotential)
            psf = find_pseudopotential(label, dirs, (".psf",))
            digest = digests.get(species_of[label])
            if digest and psf is not None and sha256_file(psf) != digest:
                problems.append(f"pseudopotential {psf.name} differs from the one the model was trained with")
    problems += setting_problems(structure.fdf_settings, card)
    if problems and not force:
        raise ModelCompatibilityError("; ".join(problems), structure.source or None)
    for p in problems:
        log.warning("--force: using the model although %s", p)
    return problems


def setting_problems(settings: dict, card: dict, trained: str = "the model was trained with") -> list[str]:
    """The run's basis and XC settings that differ from the card's, each missing one read as SIESTA's default.
    Nothing is compared for a structure without settings (an .xyz file: the basis is the model's by definition).
    ``trained`` names the card's side in the messages."""
    if not settings:
        return []
    expected = {**SIESTA_DEFAULTS, **card.get("xc", {}), **card.get("siesta_settings", {})}
    problems = []
    for key, value in expected.items():
        if key == "MeshCutoff":
            continue  # does not change the basis; a different mesh still starts well
        got = settings.get(key, SIESTA_DEFAULTS.get(key))
        if got is not None and not _same_setting(key, got, value):
            problems.append(f"fdf setting {key} is {got!r}, {trained} {value!r}")
    # A PAO.BasisSizes block sets the size of the species it lists (ASE's Siesta writes one for every species).
    trained_sizes = card.get("basis_sizes", {})
    run_size = settings.get("PAO.BasisSize", SIESTA_DEFAULTS["PAO.BasisSize"])
    for label, size in settings.get("basis_sizes", {}).items():
        expected_size = trained_sizes.get(label, expected["PAO.BasisSize"])
        said = _same_setting("PAO.BasisSize", size, run_size) and any("PAO.BasisSize is" in p for p in problems)
        if not said and not _same_setting("PAO.BasisSize", size, expected_size):
            problems.append(f"fdf block PAO.BasisSizes gives species {label!r} a {size} basis, {trained} "
                            f"{expected_size}")
    # Every other basis option (split norms, soft confinement, a PAO.Basis block, User.Basis): as trained, a missing
    # one read as SIESTA's default where it has one.
    got, known = ({normalized_fdf_key(k): (k, v) for k, v in options.items()}
                  for options in (settings.get("basis_options", {}), card.get("basis_options", {})))
    for key in sorted(set(got) | set(known)):
        default = BASIS_OPTION_DEFAULTS.get(key)
        run_value, card_value = (side[key][1] if key in side else default for side in (got, known))
        if run_value is not None and card_value is not None and (
                _same_option(run_value, card_value) or _same_as_in_an_older_card(key, run_value, card_value)):
            continue
        if key not in known:
            problems.append(f"fdf sets {got[key][0]} ({_shortened(got[key][1])}), which shapes the basis; {trained} "
                            + ("no such setting" if default is None else f"SIESTA's default ({default})"))
        elif key not in got:
            problems.append(f"{trained} {known[key][0]} ({_shortened(known[key][1])}), which shapes the basis and "
                            + ("this fdf does not set" if default is None else f"this fdf leaves at SIESTA's default "
                                                                               f"({default})"))
        else:
            problems.append(f"fdf setting {got[key][0]} is {_shortened(got[key][1])!r}, {trained} "
                            f"{_shortened(known[key][1])!r}")
    return problems


# SIESTA 4.1's defaults of the other options that shape the basis (basis_specs.f, atom.F), as sisl reads a value
# (booleans True/False, energies in eV): a run that states one is the run that leaves it out.
BASIS_OPTION_DEFAULTS = {normalized_fdf_key(k): v for k, v in {
    "PAO.BasisType": "split", "PAO.SplitNorm": 0.15, "PAO.SplitNormH": -1.0, "PAO.SplitTailNorm": False,
    "PAO.FixSplitTable": False, "PAO.NewSplitCode": False, "PAO.OldStylePolorbs": True, "PAO.SoftDefault": False,
    "PAO.SoftInnerRadius": 0.9, "PAO.SoftPotential": 40.0, "PAO.EnergyCutoff": "20 Ry",
    "PAO.EnergyPolCutoff": "20 Ry"}.items()}
_EV_PER = {"ev": 1.0, "mev": 1e-3, "ry": 13.605693122994, "mry": 13.605693122994e-3, "ha": 27.211386245988}


def _same_option(a, b) -> bool:
    """Two values of a basis option, as written or as sisl reads them, mean the same: booleans in any fdf spelling,
    numbers to 1e-3 relative (energies in eV, sisl's unit, or with their unit), else the same words."""
    def value(v):
        text = " ".join(str(v).lower().split())
        if text in ("t", "true", ".true.", "yes"):
            return True
        if text in ("f", "false", ".false.", "no"):
            return False
        number, _, unit = text.partition(" ")
        try:
            return float(number) * _EV_PER.get(unit, 1.0) if unit in _EV_PER or not unit else text
        except ValueError:
            return text

    a, b = value(a), value(b)
    if isinstance(a, float) and isinstance(b, float):
        return _close(a, b)
    return a == b


def _same_as_in_an_older_card(key: str, run_value, card_value) -> bool:
    """A bare-number basis option (``fdf.BARE_NUMBER_BASIS_KEYS``: SIESTA reads ``PAO.SoftPotential 40 Ry``
    as 40) against a card written before it was read so, which holds sisl's eV for a value given with "Ry"."""
    from .fdf import BARE_NUMBER_BASIS_KEYS

    try:
        return key in BARE_NUMBER_BASIS_KEYS and _close(float(run_value) * _EV_PER["ry"], float(card_value))
    except ValueError:
        return False


def _close(a: float, b: float) -> bool:
    """Equal to 1e-3 relative: a value printed to a few digits, or converted between units, is the same value."""
    return abs(a - b) <= 1e-3 * max(abs(a), abs(b))


def check_runs_made_as(samples, card: dict, trained: str = "the model was trained with",
                       error=ModelCompatibilityError) -> None:
    """Every run (a loaded sample) made with the XC, spin and basis settings ``card`` records; else ``error``
    naming the first run that is not and what differs (train: against its first run; evaluate: its model)."""
    for sample in samples:
        problems = setting_problems(sample.structure.fdf_settings, card, trained)
        if problems:
            raise error(f"made with other settings than the model's data: {'; '.join(problems)}", sample.name)


def _shortened(text: str, most: int = 60) -> str:
    return text if len(text) <= most else text[:most - 3] + "..."
