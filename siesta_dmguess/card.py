"""Model files: weights + JSON config + model card, with a sha256 and a compatibility guard.

A model folder holds

* ``weights.pt``   the state dict (tensors only; loaded with ``weights_only=True``, never a pickled class),
* ``config.json``  the :class:`~siesta_dmguess.model.ModelConfig` (species, per-species basis, hyperparameters),
* ``card.json``    machine-readable card: format version, sha256 of the weights, per-species basis hash,
                   XC functional and SIESTA settings, pseudopotential checksums, training data and command,
                   validation metrics, measured SCF savings,
* ``card.md``      the same card for people.

Shipped models live in the package (``siesta_dmguess/models/<name>/``) and load by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputFileError, ModelCompatibilityError
from .files import atomic_write, atomic_write_set

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS, CONFIG, CARD, CARD_MD = "weights.pt", "config.json", "card.json", "card.md"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shipped_models_dir() -> Path:
    """Folder of the models installed with the package (``models/`` in a source checkout)."""
    # An installed package has them at siesta_dmguess/models (see pyproject's package-dir); a source checkout at
    # the repo's top. Paths, not importlib.resources: models/ has no __init__.py, and a namespace package's
    # MultiplexedPath has no usable str().
    here = Path(__file__).resolve().parent
    installed = here / "models"
    return installed if installed.is_dir() else here.parent / "models"


def list_shipped_models() -> list[str]:
    root = shipped_models_dir()
    return sorted(p.name for p in root.iterdir() if (p / CARD).is_file()) if root.is_dir() else []


_SAID: set = set()  # (what resolve_model warned about, once per process)


def resolve_model(name_or_path: str | Path) -> Path:
    """A model folder from a path or the name of a shipped model."""
    if not str(name_or_path).strip():  # Path("") is ".", the current folder
        raise ModelCompatibilityError(f"no model folder or shipped model named {str(name_or_path)!r} (shipped: "
                                      f"{', '.join(list_shipped_models())})")
    p = Path(name_or_path)
    shipped = shipped_models_dir() / str(name_or_path)
    if (p / CONFIG).is_file():
        if (shipped / CONFIG).is_file() and p.resolve() != shipped.resolve() and (p.resolve(), shipped) not in _SAID:
            _SAID.add((p.resolve(), shipped))  # a folder in the working directory named as a shipped model
            log.warning("model %r: using the folder %s, not the shipped model of that name (give %s for that one)",
                        str(name_or_path), p.resolve(), shipped)
        return p
    if (shipped / CONFIG).is_file():
        return shipped
    if p.is_dir():  # a folder, but not one `train` wrote (or one whose config.json is gone)
        raise ModelCompatibilityError(f"a folder without {CONFIG}, so not a model folder (`siesta-dmguess train` "
                                      f"writes {WEIGHTS}, {CONFIG} and {CARD}); shipped models: "
                                      f"{', '.join(list_shipped_models())}", p)
    raise ModelCompatibilityError(f"no model folder or shipped model named {str(name_or_path)!r} "
                                  f"(shipped: {', '.join(list_shipped_models())})", p)


@dataclass
class LoadedModel:
    model: "torch.nn.Module"
    config: object
    card: dict
    path: Path
    basis: dict = field(default_factory=dict)
    _overlap: object = field(default=None, repr=False)

    @property
    def overlap(self):
        """An :class:`~siesta_dmguess.overlap.OverlapCalculator` for the model's basis, or None if the
        model's config carries no radial functions (models written before they were stored)."""
        if self._overlap is None and all(len(b.radial_tables) == len(b.shells) for b in self.basis.values()):
            from .overlap import OverlapCalculator

            self._overlap = OverlapCalculator(self.basis)
        return self._overlap

    def warm_up(self) -> float:
        """Pay now the one-off costs of a process's first prediction, and return the seconds they took: importing
        sisl (its fdf reader pulls in xarray and pandas: 0.5-0.9 s here) and tabulating the two-centre overlap
        integrals of every species pair (0.1-0.2 s). ``bench`` and the ASE calculator call it once, after loading
        the model, so that every prediction's time is what the next one costs; ``bench`` reports the start-up
        (the load and this) on its own line."""
        t0 = time.perf_counter()
        import sisl  # noqa: F401  (read_structure's fdf reader)

        if self.overlap is not None:
            for a in self.basis:
                for b in self.basis:
                    self.overlap.table(a, b)
        return time.perf_counter() - t0


# What ready_model's seconds hold, in the words bench and predict print them with.
STARTUP = "loading the model, importing sisl, the overlap tables"


def ready_model(model, **load_options) -> tuple[LoadedModel, float]:
    """``model`` loaded (a name or folder, with :func:`load_model`'s ``load_options``; a :class:`LoadedModel` is
    used as it is) and warmed up (:meth:`LoadedModel.warm_up`), and the seconds that took: the start-up a process
    pays once, which ``bench``, ``predict`` (for several structures) and the ASE calculator report apart from the
    predictions' times."""
    t0 = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, **load_options)
    loaded.warm_up()
    return loaded, time.perf_counter() - t0


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save, atomically (model weights, training checkpoints)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_model(model, out_dir: str | Path, card: dict) -> Path:
    """Write weights, config and card (json + md) into ``out_dir``; fills sha256, size and basis hashes."""
    import io

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # in memory first: the card holds the weights' sha256, and the files are written as a set
    torch.save({k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}, buffer)
    weights = buffer.getvalue()
    cfg = model.config.to_dict()
    basis = model.config.species_basis()
    card = dict(card)
    card.update({
        "format_version": FORMAT_VERSION,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "size_bytes": len(weights),
        "species": list(model.config.species),
        "basis": {k: {"hash": b.hash, "orbitals": b.norb, "shells": b.describe(),
                      "cutoffs_ang": [round(s.radius, 5) for s in b.shells]} for k, b in basis.items()},
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
    })
    # As one set: a save interrupted midway (train --init M --add-stage --out M grows M in place) must leave M as
    # it was or as it is now, never new weights beside the old card's sha256, which no loader accepts.
    config_text = json.dumps(cfg, indent=1)
    _write_card(out_dir, card, also={out_dir / WEIGHTS: lambda tmp: tmp.write_bytes(weights),
                                     out_dir / CONFIG: lambda tmp: tmp.write_text(config_text)})
    return out_dir


def read_card(name_or_path: str | Path) -> dict:
    """A model's card (``card.json``; ``{}`` for a folder without one), without building the network: what
    ``siesta-dmguess models`` lists."""
    path = resolve_model(name_or_path)
    try:
        return json.loads((path / CARD).read_text()) if (path / CARD).is_file() else {}
    except json.JSONDecodeError as exc:
        raise InputFileError(f"model card is not valid JSON ({exc})", path / CARD) from exc


def update_card(model_dir: str | Path, updates: dict) -> dict:
    """Merge ``updates`` into a model's card (JSON and Markdown); the weights and their sha256 are untouched."""
    path = Path(model_dir)
    card = read_card(path)
    card.update(updates)
    _write_card(path, card)
    return card


def _write_card(path: Path, card: dict, also: dict | None = None) -> None:
    """card.json and card.md (and the files ``also`` maps to writers) as one set (:func:`atomic_write_set`)."""
    texts = {CARD: json.dumps(card, indent=1), CARD_MD: card_markdown(card)}
    atomic_write_set({**(also or {}),
                      **{path / name: (lambda tmp, text=text: tmp.write_text(text)) for name, text in texts.items()}})


def card_markdown(card: dict) -> str:
    """Human-readable model card."""
    lines = [f"# Model card: {card.get('name', 'model')}", "", card.get("description", ""), ""]
    lines += ["| field | value |", "| --- | --- |"]
    for key in ("format_version", "species", "xc", "siesta_settings", "basis_options", "basis_sizes",
                "num_parameters", "size_bytes", "weights_sha256", "created"):
        if key in card:
            lines.append(f"| {key} | {card[key]} |")
    lines += ["", "## Basis per species", "", "| species | shells | hash | cutoffs (Å) |", "| --- | --- | --- | --- |"]
    for k, b in card.get("basis", {}).items():
        lines.append(f"| {k} | {b['shells']} | `{b['hash']}` | {b['cutoffs_ang']} |")
    if card.get("pseudopotentials"):
        lines += ["", "## Pseudopotentials (sha256)", ""]
        lines += [f"- {k}: `{v}`" for k, v in card["pseudopotentials"].items()]
    if card.get("training"):
        lines += ["", "## Training", "", "```", json.dumps(card["training"], indent=1), "```"]
    if card.get("validation"):
        lines += ["", "## Validation (held-out structures, `siesta-dmguess evaluate`)", "", "```",
                  json.dumps(card["validation"], indent=1), "```"]
    if card.get("validation_per_dataset"):
        lines += ["", "## Validation per dataset", "", "```", json.dumps(card["validation_per_dataset"], indent=1), "```"]
    if card.get("notes"):
        lines += ["", "## Notes", "", card["notes"]]
    if card.get("scf_benchmark"):
        lines += ["", "## SCF iterations with a real SIESTA (`siesta-dmguess bench`)", "", "```",
                  json.dumps(card["scf_benchmark"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def load_model(name_or_path: str | Path, dtype=torch.float32, verify: bool = True,
               optimize: bool | None = None) -> LoadedModel:
    """Load a model folder (or shipped model by name); checks format version and weights sha256.

    ``optimize`` lets e3nn optimize the einsums of the network's tensor products as it builds them. That
    makes loading 0.6-1.5 s slower and each prediction of a small structure 0.02-0.06 s faster (no faster on
    hundreds of atoms; ``integration/benchmarks/model_load.py``): worth it from about 30 predictions on,
    so ``predict`` turns it off for fewer structures. Both give the same DM to float precision. None: e3nn's
    default (on, unless ``e3nn.set_optimization_defaults`` turned it off, as the test suite does).
    """
    from .model import DensityMatrixModel, ModelConfig

    path = resolve_model(name_or_path)
    card = read_card(path)
    if not card and (path, CARD) not in _SAID:
        _SAID.add((path, CARD))
        log.warning("%s: the model folder has no %s, so its weights' sha256, XC functional and pseudopotentials "
                    "cannot be checked against a run: copy the card with the model", path, CARD)
    try:
        config = ModelConfig.from_dict(json.loads((path / CONFIG).read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise InputFileError(f"model config is not valid ({exc})", path / CONFIG) from exc
    version = card.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise ModelCompatibilityError(f"model format {version} is newer than this package reads ({FORMAT_VERSION})",
                                      path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ModelCompatibilityError(f"the model folder has no {WEIGHTS} (only {CONFIG} and the card were copied?)",
                                      path)
    if verify and card.get("weights_sha256") and sha256_file(weights) != card["weights_sha256"]:
        raise ModelCompatibilityError("weights.pt does not match the sha256 in card.json (corrupt or altered)", path)
    if verify and card and not card.get("weights_sha256"):  # (a folder without any card is said elsewhere)
        log.warning("%s: its card.json records no weights_sha256, so weights.pt is loaded unchecked", path)
    import e3nn

    prev, prev_e3nn = torch.get_default_dtype(), e3nn.get_optimization_defaults()
    torch.set_default_dtype(dtype)
    if optimize is not None:
        e3nn.set_optimization_defaults(optimize_einsums=optimize)
    try:
        model = DensityMatrixModel(config)
        species_basis = config.species_basis()
    except Exception as exc:  # a value of the wrong kind or a basis entry missing: any error of building it
        raise InputFileError(f"model config is not valid: the network it describes cannot be built "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                             path / CONFIG) from exc
    finally:
        torch.set_default_dtype(prev)
        e3nn.set_optimization_defaults(**prev_e3nn)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    except Exception as exc:  # a card without a sha256 (or verify=False) lets a corrupt or foreign file get here
        raise ModelCompatibilityError(f"{WEIGHTS} cannot be loaded into the network its {CONFIG} describes "
                                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", path) from exc
    model.to(dtype).eval()
    return LoadedModel(model, config, card, path, species_basis)
