"""Training: SIESTA run folders -> a model folder (weights, config, card).

The loss compares the prediction with the elements stored in each reference ``.DM``, after folding the per-image
prediction the way the reference is folded: their mean error to ``TrainOptions.loss_power`` (squared by default),
or with ``density_loss`` the density-operator error; a residual stage (``add_stage``) fits what the frozen earlier
networks leave over. Validation uses the datasets' own ``split`` (``index.json`` or each run's ``run.json``);
folders without one get a seeded random split. Training resumes from ``<out>/checkpoint.pt``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import software_versions
from .card import atomic_torch_save, save_model, sha256_file
from .correction import gets_projection, train_correction
from .data import is_aliased, load_samples, run_basis, select_runs
from .errors import DMGuessError, InputFileError
from .evaluate import atom_batches, evaluate_samples
from .files import make_output_folder
from .model import STAGE_SETTINGS, DensityMatrixModel, ModelConfig, collate, fold_to_targets, onsite_reference

log = logging.getLogger(__name__)


@dataclass
class TrainOptions:
    epochs: int = 300
    lr: float = 5e-3
    lr_final: float = 2.5e-4
    batch_atoms: int = 24
    seed: int = 0
    val_fraction: float = 0.2  # only for folders without a split in index.json
    eval_every: int = 5
    threads: int = 0  # 0: torch's default
    progress: bool = True
    max_train: int = 0  # keep at most this many training structures (0: all); for quick tests
    init: str = ""  # start from this model's weights (a model folder or shipped name) instead of at random
    correction_epochs: int = 0  # then train a ΔH head through the idempotent projection (frozen DM model)
    correction_lr: float = 1e-3
    add_stage: bool = False  # with init: add a residual stage fitted to what the init model leaves (it stays frozen)
    # Loss of folded (Γ-only, molecular) structures: Tr[(ΔD S)²], the squared error of the density operator,
    # instead of the mean squared element error, which near-null directions of S dominate in condensed phases.
    density_loss: bool = False
    # Power p of the element loss, mean |error|^p (2: mean squared). SIESTA's first SCF step is set by a guess's
    # largest error, not its mean; p > 2 weighs large errors more, and the model kept is then the one whose
    # validation structures have the lowest mean max error.
    loss_power: float = 2.0


@dataclass
class TrainResult:
    out_dir: Path
    validation: dict
    history: list = field(default_factory=list)
    resumed_at_epoch: int = 0  # the epoch a stopped run's checkpoint continued from (0: trained from the start)


def dataset_basis(data_dirs, max_train: int = 0) -> dict:
    """Species basis of the datasets: every species of every run training reads (:func:`~.data.select_runs`),
    read once per species (checked on load)."""
    from .data import find_fdf
    from .structure import read_structure

    # The selection over all datasets together, as load_samples makes it (--max-train counts across them).
    kept = {run.folder for run in select_runs(data_dirs, max_train=max_train)}
    basis = {}
    for d in data_dirs:
        labels: dict[str, Path] = {}
        for run in [r for r in select_runs([d]) if r.folder in kept]:
            for label in read_structure(find_fdf(run.folder)).labels:
                labels.setdefault(label, run.folder)
        for label, folder in labels.items():
            b = run_basis(folder, [label])[label]
            if label in basis and basis[label].hash != b.hash:
                raise InputFileError(f"species {label!r} has a different basis than in the other datasets", d)
            basis[label] = b
    return basis


def _pseudopotential_checksums(data_dirs, species) -> dict:
    """sha256 of each species' ``.psf`` in the data folders (beside the runs or in their ``basis/``), for the card.
    Two folders with different pseudopotentials for one species are an error naming both: the model would learn
    DMs of two different potentials, and its card could record only one (the guard then refused the other's runs)."""
    from .siesta.runner import find_pseudopotential

    out, where = {}, {}
    for d in data_dirs:
        for label in species:
            found = find_pseudopotential(label, [Path(d), Path(d) / "basis"], (".psf",))
            if found is None:
                continue
            checksum = sha256_file(found)
            if label in out and out[label] != checksum:
                raise InputFileError(f"differs from {where[label]}, the pseudopotential of species {label!r} in "
                                     "another training folder: train on runs made with one pseudopotential per "
                                     "species", found)
            out[label], where[label] = checksum, found
    return out


def _split(records_samples, options: TrainOptions):
    other = [s.name for s in records_samples if s.meta.get("split") not in ("train", "val", "", None)]
    if other:  # a "test" split, or a misspelt "Val": neither trained on nor validated against, so say so
        log.warning("%d run(s) record a split other than train or val and are left out of training and validation: "
                    "%s", len(other), ", ".join(other[:5]) + (" ..." if len(other) > 5 else ""))
    train = [s for s in records_samples if s.meta.get("split") in ("train", "", None)]
    val = [s for s in records_samples if s.meta.get("split") == "val"]
    rng = np.random.default_rng(options.seed)

    def hold_out(candidates):  # (a seeded share of the candidates, at least one; the rest), in the seeded order
        order = rng.permutation(len(candidates))
        n_val = max(1, int(round(options.val_fraction * len(candidates))))
        return [candidates[k] for k in order[:n_val]], [candidates[k] for k in order[n_val:]]

    if not val:  # no split given: seeded random hold-out
        val, train = hold_out(train)
    else:
        # Runs that record no split belong to every split (docs/models.md): beside a folder whose runs record a
        # val split, a seeded share of them is held out too (else none of them, e.g. all the carbon of a batch,
        # would be validated).
        unrecorded = [s for s in train if s.meta.get("split") in ("", None)]
        if unrecorded:
            held = hold_out(unrecorded)[0]
            val = val + held
            held_ids = {id(s) for s in held}
            train = [s for s in train if id(s) not in held_ids]
    if options.max_train:
        train = train[: options.max_train]
    return train, val


# ModelConfig fields a training run sets itself, never ``--config``: species and basis come from the data, the seed
# from --seed, the on-site reference and the residual stages from training.
RUN_SETTINGS = ("species", "basis", "seed", "onsite_reference", "residual_stages")


def check_config_overrides(overrides: dict) -> None:
    """Raise a clear error for a ``--config`` that is not a JSON object of settable :class:`ModelConfig` fields.
    (With ``--add-stage``, the fields of :data:`~siesta_dmguess.model.STAGE_SETTINGS` go to the new stage.)"""
    if not isinstance(overrides, dict):
        raise DMGuessError(f"--config must be a JSON object of model settings, got {type(overrides).__name__}")
    fields = set(ModelConfig.__dataclass_fields__)
    owned = sorted(set(overrides) & set(RUN_SETTINGS))
    if owned:
        raise DMGuessError(f"--config cannot set {owned}: " + "; ".join(
            {"seed": "use --seed", "species": "species come from the data", "basis": "the basis comes from the data",
             "onsite_reference": "fitted from the training data",
             "residual_stages": "use --init MODEL --add-stage"}[k] for k in owned))
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise DMGuessError(f"--config has unknown model settings {unknown}; known: "
                           f"{sorted(fields - set(RUN_SETTINGS))}")
    for key, value in overrides.items():
        problem = _config_value_problem(key, value)
        if problem:
            raise DMGuessError(f"--config {key}: {problem}, got {value!r}")


# Allowed words of the ModelConfig settings that take one (model.py and layers.py read them).
_CONFIG_CHOICES = {"radial_basis": ("bessel", "gaussian"), "embedding": ("species", "density"),
                   "pair_set": ("pattern", "all", "added", "onsite")}
_POSITIVE = ("mp_cutoff", "num_layers", "num_radial", "radial_hidden", "avg_num_neighbors", "correction_scale")


def _config_value_problem(key: str, value) -> str:
    """What is wrong with one ``--config`` value ("" if nothing), before a network is built from it (a negative
    cutoff ended in a bare ``math domain error``, a misspelt irreps string in e3nn's parser traceback)."""
    from .e3nn_modules import o3

    default = ModelConfig.__dataclass_fields__[key].default
    if isinstance(default, bool):
        return "" if isinstance(value, bool) else "must be true or false"
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "must be a number"
        if isinstance(default, int) and value != int(value):
            return "must be a whole number"
        if key in _POSITIVE and value <= 0:
            return "must be positive"
        return "must not be negative" if value < 0 else ""
    if key in _CONFIG_CHOICES:
        return "" if value in _CONFIG_CHOICES[key] else f"must be one of {', '.join(_CONFIG_CHOICES[key])}"
    if key.endswith("_irreps"):
        if not isinstance(value, str):
            return "must be an irreps string such as '16x0e + 8x1o'"
        if value == "" and key == "product_irreps":
            return ""  # no many-body product
        try:
            o3.Irreps(value)
        except (ValueError, AssertionError) as exc:
            return f"is not an irreps string such as '16x0e + 8x1o' ({exc})"
    return ""


def train(data_dirs, out_dir, options: TrainOptions | None = None, config_overrides: dict | None = None,
          resume: bool = True, command: str | None = None) -> TrainResult:
    """Train a density-matrix model on SIESTA run folders and save it to ``out_dir``.

    ``config_overrides`` sets :class:`ModelConfig` fields (cutoff, irreps, layers, ...).
    Progress is shown with a progress bar; a checkpoint is written every epoch so
    an interrupted run continues where it stopped (``resume=True``).
    """
    from tqdm.auto import tqdm

    options = options or TrainOptions()
    if options.density_loss and options.loss_power != 2:
        raise DMGuessError("--loss-power sets the element loss; --density-loss replaces it: use one of the two")
    if options.loss_power < 1:
        raise DMGuessError(f"--loss-power must be at least 1 (got {options.loss_power:g})")
    if options.add_stage and not options.init:
        raise DMGuessError("--add-stage needs --init: the model whose residual the new stage learns")
    if not options.epochs and not options.init:  # it would write an untrained network as if it were a model
        raise DMGuessError("--epochs 0 trains nothing: give --epochs N, or --init MODEL to re-measure a model (and "
                           "train its ΔH head with --correction-epochs)")
    check_config_overrides(config_overrides or {})
    data_dirs = [Path(d) for d in data_dirs]
    out_dir = Path(out_dir)
    make_output_folder(out_dir, create=False)  # a file in the way is said at once; the folder is made below
    _check_out_is_no_data_folder(out_dir, data_dirs)
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)

    basis = dataset_basis(data_dirs, options.max_train)
    species = sorted(basis, key=lambda l: (basis[l].Z, l))
    pseudopotentials = _pseudopotential_checksums(data_dirs, species)  # before training: one per species
    overrides = dict(config_overrides or {})
    if options.correction_epochs:
        overrides["correction_head"] = True
    # With --add-stage, settings of a network's form (a wider mp_cutoff, more layers, ...) are the new stage's:
    # given to the whole model they would change what the frozen networks see.
    stage_overrides = {k: overrides.pop(k) for k in list(overrides) if k in STAGE_SETTINGS} \
        if options.add_stage else {}
    if overrides.get("pair_set") == "onsite":
        raise DMGuessError("pair_set 'onsite' predicts no pair blocks: it is for a residual stage (--add-stage)")
    init, init_card = _init_model(options.init, basis, overrides) if options.init else (None, None)
    cfg = init.config if init else ModelConfig(species=species, basis={k: b.to_dict() for k, b in basis.items()},
                                               seed=options.seed, **overrides)
    species = cfg.species
    cutoff = max(cfg.message_cutoff, float(stage_overrides.get("mp_cutoff", 0.0)))
    samples = load_samples(data_dirs, species, basis, cutoff, progress=options.progress, with_overlap=True,
                           fold_reach=cfg.fold_reach, max_train=options.max_train)
    check_same_settings(samples, init_card)
    train_set, val_set = _split(samples, options)
    if not train_set:
        if len(samples) == 1:  # the random hold-out took it
            raise InputFileError("only one run: training needs at least two, one of them held out to validate the "
                                 "model (or runs whose index.json / run.json records a train and a val split)",
                                 data_dirs[0])
        raise InputFileError("no training structures: every run is held out for validation or records another "
                             "split", data_dirs[0])
    if not init:  # the species come from every run; one only in val runs (or past --max-train) would get
        # untrained blocks and a novelty statistic of nothing, which scores its structures as familiar
        untrained = sorted(set(species) - {species[k] for s in train_set for k in np.unique(s.species)})
        if untrained:
            raise InputFileError(f"species {untrained} are in no training structure (only in validation runs, or in "
                                 f"runs past --max-train): give training runs of them, or leave their runs out",
                                 data_dirs[0])
    # Said before the DM training, not after it (its checkpoint, of a config with a ΔH head, would not resume).
    if options.correction_epochs and not any(gets_projection(s) for s in train_set):
        raise InputFileError("--correction-epochs: no training structure gets the dense projection the ΔH head "
                             "is trained through (Γ-only or molecular, even electron count; k-point runs are only "
                             "charge-scaled): leave the option out for these data", data_dirs[0])
    if options.density_loss and not any(s.fold for s in train_set):  # it would silently be the element loss
        raise InputFileError("--density-loss: no training structure is folded (Γ-only or molecular), so every "
                             "structure would get the plain element loss: leave the option out for k-point runs",
                             data_dirs[0])
    previous, val_reference, onsite_stage = None, None, False
    if options.density_loss:  # the validation structures too: the model kept is the one with the best density
        attach_folded_overlap(train_set + val_set, basis)
    if options.add_stage:
        if options.density_loss:  # relative too: each structure's density loss over the frozen model's
            for sample, value in zip(train_set + val_set, structure_density_losses(init, train_set + val_set)):
                sample.meta["density_reference"] = max(value, 1e-30)
        else:  # per-structure MAEs of the frozen model: a stage is judged by how much it lowers each one's error
            val_reference = np.array([m["mae"] for m in evaluate_samples(init.eval(), val_set)["structures"]])
        model, previous = add_residual_stage(init, train_set, keep_correction=bool(options.correction_epochs),
                                             overrides=stage_overrides)
        onsite_stage = model.config.residual_stages[-1].get("pair_set") == "onsite"
        cfg = model.config
    elif init:
        model = init
        for stage in model.residuals:  # fine-tuning changes the features their novelty statistics were of
            stage.novelty_threshold.zero_()
    else:
        cfg.avg_num_neighbors = mean_neighbours(train_set, cfg.mp_cutoff)
        cfg.onsite_reference = onsite_reference(train_set, species, basis)
        model = DensityMatrixModel(cfg)
        # Data-dependent initialization of the feature standardization (a no-op for models without it).
        model.fit_feature_norms([collate(g, len(species), torch.float32)
                                 for g in atom_batches(train_set, 256, shuffle=False)])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=options.lr)
    gamma = (options.lr_final / options.lr) ** (1.0 / max(options.epochs, 1))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
    start_epoch, history, best = 0, [], {"score": math.inf, "state": None, "epoch": -1}
    ckpt_path = out_dir / "checkpoint.pt"
    ckpt = _read_checkpoint(ckpt_path) if resume else None
    wall_before = 0.0  # training time of the runs this one resumes
    if ckpt is not None:
        if ckpt.get("config") == cfg.to_dict():
            _check_resume_options(ckpt, options, out_dir)
            _load_state(model, ckpt["model"]), opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            start_epoch, history, best = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"]
            wall_before = ckpt.get("wall_s", 0.0)
            if ckpt.get("options", {}).get("epochs", options.epochs) != options.epochs and start_epoch < options.epochs:
                # more epochs than first asked: decay from here to lr_final over the new end, as a fresh run would
                sched.gamma = (options.lr_final / sched.get_last_lr()[0]) ** (1.0 / (options.epochs - start_epoch))
            if "mae" in best:  # checkpoints written before the best score was renamed
                best["score"] = best.pop("mae")
            rng = np.random.default_rng([options.seed, start_epoch])
            log.info("resuming from epoch %d", start_epoch)
    if resume and start_epoch == 0:
        _check_no_model_replaced(out_dir, options.init, cfg)
        if ckpt is not None and ckpt.get("config") is not None:  # a stopped training of another configuration
            raise DMGuessError(f"holds a stopped training (checkpoint.pt, {ckpt.get('epoch', -1) + 1} epochs) that "
                               f"this run cannot resume: {_config_differences(ckpt['config'], cfg.to_dict())}. Run "
                               f"the command that started it, or give another --out, or --restart to train afresh",
                               out_dir)

    make_output_folder(out_dir)  # not before: a run refused for its data leaves no empty model folder behind
    bar = tqdm(range(start_epoch, options.epochs), disable=not options.progress,
               desc=f"training (resumed after {start_epoch} epochs)" if start_epoch else "training",
               initial=start_epoch, total=options.epochs, file=sys.stderr)
    t0 = time.time()
    for epoch in bar:
        model.train()
        losses = []
        for group in atom_batches(train_set, options.batch_atoms, shuffle=True, rng=rng):
            batch = collate(group, len(species), torch.float32)
            if previous is None:
                pred = fold_to_targets(model(batch), batch)
                loss = density_loss(pred - batch["target_values"], group) if options.density_loss else \
                    torch.mean((pred - batch["target_values"]).abs() ** options.loss_power)
            else:  # only the new stage runs (the frozen model's output was computed once); relative errors
                stage = model.residuals[-1]
                flat = torch.cat([previous[id(g)][0] for g in group]) + \
                    stage.stage_blocks(stage.node_features(batch), batch)
                pred = fold_to_targets(flat, batch)
                if options.density_loss:
                    loss = density_loss(pred - batch["target_values"], group)
                else:
                    # Mean |error / frozen RMS|^p per structure: the weight 1 / Σ r² to the p/2, times n^(p/2) / n.
                    which, power = batch["sample_of_target"], options.loss_power
                    error = pred - batch["target_values"]
                    if onsite_stage:  # the elements it can change (the rest add a constant)
                        learned = torch.cat([previous[id(g)][2] for g in group])
                        which, error = which[learned], error[learned]
                    weight = torch.stack([previous[id(g)][1] for g in group])[which]
                    n = torch.bincount(which, minlength=len(group)).to(weight.dtype)[which]
                    weight = weight ** (power / 2) * n ** (power / 2 - 1)
                    loss = torch.sum(weight * error.abs() ** power) / len(group)
            if loss.requires_grad:  # a batch a stage gives no blocks (molecules for a folding stage) teaches nothing
                opt.zero_grad()
                loss.backward()
                opt.step()
            losses.append(loss.item())
        sched.step()
        # A residual stage's loss is relative (1 = what the frozen model leaves over), a first model's absolute.
        relative = "" if previous is None else "relative_"
        if options.density_loss:
            loss_key, train_loss = f"train_{relative}density_loss", float(np.mean(losses))
        else:  # the p-th root of mean |error|^p: the RMSE for p = 2
            name = "rmse" if options.loss_power == 2 else f"l{options.loss_power:g}"
            loss_key, train_loss = f"train_{relative}{name}", float(np.mean(losses) ** (1.0 / options.loss_power))
        record = {"epoch": epoch, loss_key: train_loss, "lr": sched.get_last_lr()[0]}
        if val_set and (epoch % options.eval_every == 0 or epoch == options.epochs - 1):
            model.eval()
            evaluation = evaluate_samples(model, val_set)
            summary = evaluation["summary"]
            record.update(val_mae=summary["mae"], val_max_abs=summary["max_abs"])
            score = summary["mae"]
            if options.density_loss:  # judged by what it is trained for, not by the element MAE it trades away
                score = record[f"val_{relative}density_loss"] = validation_density_loss(model, val_set)
            elif options.loss_power > 2 or onsite_stage:  # likewise: by each structure's largest error (the
                # first SCF step's size; an on-site stage barely moves the MAE, but the largest errors are its own)
                score = record["val_mean_max_abs"] = float(np.mean([m["max_abs"] for m in evaluation["structures"]]))
            elif val_reference is not None:  # mean of MAE / frozen model's MAE: molecules count as much as boxes
                score = record["val_relative_mae"] = float(np.mean(
                    [m["mae"] for m in evaluation["structures"]] / val_reference))
            if score < best["score"]:
                best = {"score": score, "epoch": epoch,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        history.append(record)
        # the best validation score so far: MAE, relative MAE (residual stage) or density loss (--density-loss)
        bar.set_postfix(loss=f"{record[loss_key]:.2e}", val_best=f"{best['score']:.2e}")
        atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "epoch": epoch, "history": history,
                           "best": best, "config": cfg.to_dict(), "options": asdict(options),
                           "wall_s": wall_before + time.time() - t0}, ckpt_path)
    if best["state"] is not None:
        _load_state(model, best["state"])
    model.eval()
    model.fit_novelty([collate(g, len(species), torch.float32, with_targets=False)
                       for g in atom_batches(train_set, 256, shuffle=False)])
    from .overlap import overlap_calculator

    overlap = overlap_calculator(basis)
    if options.correction_epochs:
        if overlap is None:
            raise InputFileError("the ΔH head needs the basis' radial functions (.ion.xml) for S", data_dirs[0])
        history.extend(train_correction(model, train_set, val_set, overlap, options))
    validation = evaluate_samples(model, val_set, overlap=overlap) if val_set else {"summary": {}, "structures": []}
    card = {
        "name": out_dir.name,
        "description": f"Equivariant DM model for {', '.join(species)} trained on {', '.join(d.name for d in data_dirs)}.",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **settings_record(samples[0].structure.fdf_settings if samples else {}, samples),
        "pseudopotentials": {label: pseudopotentials[label] for label in species if label in pseudopotentials},
        "training": {"data": [str(d) for d in data_dirs], "train_structures": len(train_set),
                     "val_structures": len(val_set), "options": asdict(options), "best_epoch": best["epoch"],
                     # the runs the seeded hold-out drew (their records name no split): evaluate scores these
                     "held_out_runs": sorted(str(Path(s.name).resolve()) for s in val_set
                                             if s.meta.get("split") != "val"),
                     # whether any training run sampled its crystal more coarsely than its DM's range (predict.py)
                     "aliased_sampling": any(is_aliased(s) for s in train_set),
                     # the --init model's training record and weights, so that a chain of runs names each start
                     **({"init_model_training": init_card.get("training", {}),
                         "init_model_sha256": init_card.get("weights_sha256")} if init else {}),
                     "wall_s": round(wall_before + time.time() - t0, 1), "command": command,
                     "software": software_versions()},
        "validation": {"split": "val", **validation["summary"]},
        "novelty_threshold": float(model.novelty_threshold),
    }
    save_model(model, out_dir, card)
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    plot_history(history, out_dir / "training.png")
    return TrainResult(out_dir, validation, history, start_epoch)


def attach_folded_overlap(samples, basis) -> None:
    """Dense folded S (from the basis) in ``sample.meta['folded_overlap']`` of every folded sample, and where its
    stored elements sit in it (``'folded_positions'``), computed once for :func:`density_loss`."""
    from .dm import flat_to_csr
    from .overlap import OverlapCalculator

    calculator = OverlapCalculator(basis)
    for sample in samples:
        if sample.fold:
            s_flat = calculator.flat(sample.structure, sample.layout)
            sample.meta["folded_overlap"] = torch.as_tensor(flat_to_csr(sample.layout, s_flat, True).toarray(),
                                                            dtype=torch.float32)
            rows, cols = (torch.as_tensor(x) for x in sample.stored_cell_positions())
            keep = rows >= 0
            sample.meta["folded_positions"] = (keep, rows[keep], cols[keep])


def density_loss(residual: torch.Tensor, group) -> torch.Tensor:
    """Mean over the group's structures of Tr[(E S)²] / n_orbitals, E the folded error (dense, at the stored
    elements); the mean squared element error for structures without a folded S (k-point runs). A structure
    with ``meta['density_reference']`` (a residual stage's frozen model's value) counts relative to it, so
    molecules the frozen model predicts far better than boxes still count as much as the boxes."""
    return torch.stack(_structure_losses(residual, group)).mean()


def _structure_losses(residual: torch.Tensor, group, relative: bool = True) -> list[torch.Tensor]:
    """:func:`density_loss` of each structure of the group (over its ``density_reference`` if ``relative``)."""
    losses, start = [], 0
    for sample in group:
        r = residual[start:start + sample.target_values.size]
        start += sample.target_values.size
        s = sample.meta.get("folded_overlap")
        if s is None:
            loss = torch.mean(r**2)
        else:
            keep, rows, cols = sample.meta["folded_positions"]
            error = torch.zeros_like(s).index_put((rows, cols), r[keep], accumulate=True)
            es = error @ s
            loss = torch.sum(es * es.T) / s.shape[0]
        losses.append(loss / sample.meta.get("density_reference", 1.0) if relative else loss)
    return losses


def structure_density_losses(model: DensityMatrixModel, samples, relative: bool = False) -> list[float]:
    """:func:`density_loss` of ``model``'s raw prediction for each sample: absolute, or over the sample's
    ``density_reference`` if ``relative``."""
    model.eval()
    values = []
    with torch.no_grad():
        for group in atom_batches(samples, 256, shuffle=False):
            batch = collate(group, len(model.species), torch.float32)
            residual = fold_to_targets(model(batch), batch) - batch["target_values"]
            values.extend(float(v) for v in _structure_losses(residual, group, relative))
    return values


def validation_density_loss(model: DensityMatrixModel, samples) -> float:
    """Mean :func:`density_loss` of the raw prediction over ``samples`` (the selection score of a
    ``--density-loss`` training)."""
    return float(np.mean(structure_density_losses(model, samples, relative=True))) if samples else 0.0


def _init_model(name_or_path: str, basis: dict, overrides: dict) -> tuple[DensityMatrixModel, dict]:
    """A model built from another model's config (plus ``overrides``) with its weights, new heads starting
    fresh, and the other model's card (its training record goes into the new card; its settings hold for the new
    data too)."""
    from .card import load_model

    loaded = load_model(name_or_path)
    for label, b in basis.items():
        if label not in loaded.basis or loaded.basis[label].hash != b.hash:
            raise InputFileError(f"--init model {name_or_path!r} has no or another basis for species {label!r}",
                                 loaded.path)
    if overrides.get("correction_head") and not loaded.config.correction_head:  # a new head: today's defaults
        overrides = {"correction_scale": ModelConfig.correction_scale, **overrides}
    cfg = ModelConfig.from_dict({**loaded.config.to_dict(), **overrides})
    model = DensityMatrixModel(cfg)
    missing, unexpected = model.load_state_dict(loaded.model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("correction_") for k in missing):
        raise InputFileError(f"--init model {name_or_path!r} does not fit this configuration", loaded.path)
    return model, loaded.card


def mean_neighbours(samples, cutoff: float) -> float:
    """Mean number of message-passing neighbours per atom within ``cutoff`` Å: normalizes a network's
    aggregation. Samples may carry edges beyond it (a wider residual stage, ``ModelConfig.message_cutoff``)."""
    counts = [np.sum(np.linalg.norm(s.mp_edges.vectors, axis=1) < cutoff) / s.species.size for s in samples]
    return float(np.mean(counts)) or 1.0


def add_residual_stage(model: DensityMatrixModel, train_set, keep_correction: bool = False,
                       overrides: dict | None = None) -> tuple[DensityMatrixModel, dict]:
    """``model`` plus one residual stage (:attr:`ModelConfig.residual_stages`) scaled to the RMS of what ``model``
    leaves over on ``train_set``, with every other parameter frozen; and, keyed by ``id(sample)``, ``model``'s flat
    prediction (so that training runs only the new stage) and the weight that makes the stage's loss relative:
    1 / (elements x mean squared residual) of that sample. Molecules that ``model`` already predicts 20x better
    than periodic boxes then count as much as the boxes, instead of vanishing from a plain mean squared error.
    For an on-site stage (``pair_set`` "onsite") the scale and weight are those of the on-site residual, and the
    third item of each value marks the sample's reference elements that on-site blocks fall on (else None).

    A ΔH head of ``model`` was trained to steer the projection of the DM it had; the stage changes that DM, so
    the head is dropped unless ``keep_correction`` (it is then retrained: ``--correction-epochs``).

    ``overrides`` (keys of :data:`~siesta_dmguess.model.STAGE_SETTINGS`) give the stage a form of its own, e.g. a
    wider ``mp_cutoff``; the samples must then carry edges that far (``ModelConfig.message_cutoff``)."""
    from .evaluate import folded_to_reference, predict_flat

    model.eval()
    flats = predict_flat(model, train_set)
    residuals = [folded_to_reference(s, f) - s.target_values for s, f in zip(train_set, flats)]
    overrides = dict(overrides or {})
    # An on-site stage is scaled to, and its loss taken over, what it can change: the on-site residual.
    learned = [_onsite_target_mask(s) if overrides.get("pair_set") == "onsite" else None for s in train_set]
    residuals = [r if k is None else r[k] for r, k in zip(residuals, learned)]
    rms = float(np.sqrt(np.mean(np.concatenate(residuals) ** 2)))
    unknown = sorted(set(overrides) - set(STAGE_SETTINGS))
    if unknown:
        raise DMGuessError(f"not settings of a residual stage: {unknown} (allowed: {list(STAGE_SETTINGS)})")
    if "mp_cutoff" in overrides and "avg_num_neighbors" not in overrides:
        overrides["avg_num_neighbors"] = mean_neighbours(train_set, float(overrides["mp_cutoff"]))
    stage = {"output_scale": rms, **overrides}
    covered = model.config.pair_set != "pattern" or any(st.get("pair_set") in ("added", "all")
                                                        for st in model.config.residual_stages)
    if model.config.fold_reach > 0 and not covered and "pair_set" not in overrides:
        # The first stage that meets pairs added for folding, on a model of SIESTA's pattern, predicts exactly
        # those (molecules and large cells have none, so it cannot change them). Otherwise a stage inherits the
        # model's pair set.
        stage["pair_set"] = "added"
    config = ModelConfig.from_dict({**model.config.to_dict(),
                                    "residual_stages": model.config.residual_stages + [stage],
                                    "correction_head": model.config.correction_head and keep_correction})
    new = DensityMatrixModel(config)
    k = len(config.residual_stages) - 1
    state = {key: v for key, v in model.state_dict().items()
             if config.correction_head or not key.startswith("correction_")}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or any(not key.startswith(f"residuals.{k}.") for key in missing):
        raise RuntimeError(f"residual stage {k} does not fit the model: {(unexpected + missing)[:5]}")
    for name, param in new.named_parameters():
        param.requires_grad_(name.startswith(f"residuals.{k}."))
    # The stage keeps the novelty statistics of the model it is added to (of that frozen model's features): the
    # training refits the model's own on the stage's data, and structures like the earlier data stay familiar.
    # (Not where the stage has other hidden irreps: its buffers are sized to its own features.)
    if new.residuals[k].novelty_mean.shape == model.novelty_mean.shape:
        for buffer in ("novelty_mean", "novelty_precision", "novelty_threshold"):
            getattr(new.residuals[k], buffer).copy_(getattr(model, buffer))
    log.info("residual stage %d: output scale %.3e (RMS of the frozen model's training error)", k, rms)
    previous = {id(s): (torch.as_tensor(f, dtype=torch.float32),
                        torch.tensor(1.0 / max(float(np.sum(r**2)), 1e-30), dtype=torch.float32),
                        None if k is None else torch.as_tensor(k))
                for s, f, r, k in zip(train_set, flats, residuals, learned)}
    return new, previous


def _onsite_target_mask(sample) -> np.ndarray:
    """True on the reference's stored elements that on-site blocks fall on."""
    lay = sample.layout
    index = sample.target_index[lay.element_block < lay.n_onsite]
    mask = np.zeros(sample.target_values.size, bool)
    mask[index[index >= 0]] = True
    return mask


def _check_out_is_no_data_folder(out_dir: Path, data_dirs: list[Path]) -> None:
    """Error if ``--out`` is a dataset or run folder (one of the training folders, or one holding ``index.json``, an
    fdf or run folders): a probe's model went into its own training data, mixing model files with runs."""
    if not out_dir.is_dir():
        return
    if any(out_dir.resolve() == d.resolve() for d in data_dirs):
        raise DMGuessError("is one of the training data folders: give the model its own --out folder", out_dir)
    if (out_dir / "index.json").is_file() or any(out_dir.glob("*.fdf")) or any(out_dir.glob("*/*.fdf")):
        raise DMGuessError("holds SIESTA runs (an index.json, an fdf or run folders), not a model: give the model "
                           "its own --out folder", out_dir)


def _check_no_model_replaced(out_dir: Path, init: str | None, cfg: ModelConfig) -> None:
    """Training afresh into a folder that holds a finished model would replace that model: refused unless asked for
    (``--restart``), or unless the folder is the ``--init`` model's own (``train --init M --add-stage --out M``
    grows M in place, as the shipped models were made). A typo in ``--out`` lost a model, before."""
    from .card import CONFIG, WEIGHTS, resolve_model

    if not (out_dir / WEIGHTS).is_file():
        return
    if init and resolve_model(init).resolve() == out_dir.resolve():
        return
    try:
        why = _config_differences(json.loads((out_dir / CONFIG).read_text()), cfg.to_dict())
    except (OSError, ValueError, AttributeError):
        why = "its configuration cannot be read"
    raise DMGuessError(f"holds a model that this training run cannot resume ({why}) and would replace: give "
                       "another --out, or --restart to replace it", out_dir)


# ModelConfig fields that train sets from the training data, not from the command line.
_FROM_DATA = ("species", "basis", "onsite_reference", "avg_num_neighbors")


def _config_differences(saved: dict, now: dict) -> str:
    """What differs between a saved model configuration and this run's, in words (which options, or the data)."""
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    data = [k for k in differ if k in _FROM_DATA]
    options = [k for k in differ if k not in _FROM_DATA]
    words = []
    if options:
        words.append("other settings: " + ", ".join(f"{k} {saved.get(k)!r} (now {now.get(k)!r})" for k in options))
    if data:
        words.append(f"other training data ({', '.join(data)} differ)")
    return "; ".join(words) or "the same configuration, but no checkpoint to resume it from"


# TrainOptions a resumed run must share with its checkpoint: the optimizer, the data and the score it kept its best
# model by. (--epochs may grow: the learning rate then decays to lr_final over the new end.)
RESUME_OPTIONS = ("lr", "lr_final", "batch_atoms", "seed", "max_train", "val_fraction", "init", "add_stage",
                  "density_loss", "loss_power")


def _check_resume_options(ckpt: dict, options: TrainOptions, out_dir: Path) -> None:
    """Error if resuming the checkpoint with ``options`` would train on with other settings than it was made with
    (the card would record the new ones for a model trained mostly by the old), or if it has already trained
    beyond ``--epochs``."""
    saved = ckpt.get("options")
    if saved is None:  # checkpoints written before the options were kept
        return
    changed = [f"--{k.replace('_', '-')} {saved[k]!r} (now {getattr(options, k)!r})"
               for k in RESUME_OPTIONS if k in saved and saved[k] != getattr(options, k)]
    if changed:
        raise DMGuessError("its checkpoint was trained with " + ", ".join(changed) + ": resume it with the same "
                           "options, or give --restart to train afresh", out_dir)
    done = ckpt["epoch"] + 1
    if done > options.epochs:
        raise DMGuessError(f"its checkpoint has trained {done} epochs, more than --epochs {options.epochs}: give "
                           f"--epochs {done} or more to resume it, or --restart", out_dir)


def _read_checkpoint(path: Path) -> dict | None:
    """The checkpoint to resume from, or None (with a warning naming the file) if it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or foreign file: training can still start afresh, nothing else is lost
        log.warning("cannot resume from %s (%s: %s); starting afresh", path, type(exc).__name__, exc)
        return None


def _load_state(model, state: dict) -> None:
    """Load weights; the novelty statistics are refitted after training, so a checkpoint may lack them."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith("novelty_")] + list(unexpected)
    if bad:
        raise RuntimeError(f"checkpoint does not match the model: {bad[:5]}")


def settings_record(settings: dict, samples=()) -> dict:
    """The card's record of the settings a run was made with (``read_fdf_settings``): XC, the basis settings
    and, where the fdf sets any, its other basis options and per-species sizes (``predict`` compares them all).
    ``samples``: the training runs, whose MeshCutoff may differ (it is not checked, as it does not change the
    basis): a list of their values then, where the first run's alone would misstate the others."""
    def pick(keys):
        return {k: settings[k] for k in keys if k in settings}

    record = {"xc": pick(("XC.functional", "XC.authors")),
              "siesta_settings": pick(("PAO.BasisSize", "PAO.EnergyShift", "MeshCutoff", "Spin")),
              **pick(("basis_options", "basis_sizes"))}
    meshes = sorted({str(s.structure.fdf_settings.get("MeshCutoff", "300 Ry")) for s in samples},  # (4.1's default)
                    key=lambda v: float(v.split()[0]))
    if len(meshes) > 1:
        record["siesta_settings"]["MeshCutoff"] = meshes
    return record


def check_same_settings(samples, init_card: dict | None = None) -> None:
    """Every training run made with the XC, spin and basis settings of the first (with ``--init``, of that
    model's card): a card records one set, which ``predict`` then holds every run to, so runs made otherwise
    would be learned under a wrong label (another functional's DMs in an LDA model)."""
    from .guard import check_runs_made_as

    if samples:
        reference = init_card or settings_record(samples[0].structure.fdf_settings)
        named = "the --init model was trained with" if init_card else f"{samples[0].name} (the first run) has"
        check_runs_made_as(samples, reference, named, InputFileError)


def plot_history(history: list, path: Path) -> None:
    """Training loss and validation score per epoch (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = [("train_rmse", "-", "train RMSE (DM elements)"), ("val_mae", "o-", "validation MAE (DM elements)"),
              ("train_relative_rmse", "-", "residual stage: train RMSE / frozen model's"),
              ("val_relative_mae", "o-", "residual stage: validation MAE / frozen model's"),
              ("train_density_loss", "-", "train density loss Tr[(ΔD S)²] / n_orb"),
              ("val_density_loss", "o-", "validation density loss"),
              ("train_relative_density_loss", "-", "residual stage: train density loss / frozen model's"),
              ("val_relative_density_loss", "o-", "residual stage: validation density loss / frozen model's"),
              ("train_density_error", "-", "ΔH head: train density error / plain projection's"),
              ("val_density_error", "o-", "ΔH head: validation density error / plain projection's")]
    for key, style, label in series:
        points = [(h["epoch"], h[key]) for h in history if key in h]
        if points:
            ax.semilogy(*zip(*points), style, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("DM error (electrons) or density loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
