"""Training end to end on a few shared structures: files, card, learning, resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from siesta_dmguess import software_versions
from siesta_dmguess.card import load_model, sha256_file
from siesta_dmguess.errors import DMGuessError, InputFileError
from siesta_dmguess.train import TrainOptions, train

from .conftest import dataset

TINY = {"hidden_irreps": "8x0e + 4x1o + 2x1e + 4x2e + 2x2o + 2x3o + 2x3e + 1x4e",
        "pair_irreps": "4x0e + 2x1o + 2x1e + 2x2e + 2x2o", "radial_hidden": 16, "mp_cutoff": 3.0}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model trained on h2o, read-only: the frozen model the stage and correction tests start from (trained
    once for all of them)."""
    base = tmp_path_factory.mktemp("h2o-base") / "base"
    train([dataset("h2o")], base, TrainOptions(epochs=3, lr=1e-2, batch_atoms=12, max_train=8, progress=False), TINY)
    return base


def test_train_writes_model_learns_and_resumes(tmp_path):
    data = dataset("h2o")
    out = tmp_path / "m"
    opts = TrainOptions(epochs=6, lr=1e-2, batch_atoms=12, max_train=12, eval_every=1, progress=False)
    result = train([data], out, opts, TINY)
    card = json.loads((out / "card.json").read_text())
    assert card["weights_sha256"] == sha256_file(out / "weights.pt")
    assert card["species"] == ["H", "O"] and card["xc"] == {"XC.functional": "LDA", "XC.authors": "CA"}
    assert set(card["pseudopotentials"]) == {"H", "O"}
    assert card["validation"]["structures"] == 12  # the dataset's own val split
    # Learning: the trained model beats SIESTA's atomic guess on held-out structures.
    assert card["validation"]["mae"] < card["validation"]["atomic_mae"]
    assert (out / "training.png").stat().st_size > 1000
    loaded = load_model(out)
    assert loaded.config.species == ["H", "O"]
    # Resume: asking for more epochs continues from the checkpoint instead of restarting.
    result2 = train([data], out, TrainOptions(**{**opts.__dict__, "epochs": 8}), TINY)
    assert [h["epoch"] for h in result2.history] == list(range(8)) and result2.resumed_at_epoch == 6
    assert result.resumed_at_epoch == 0
    assert result2.history[:6] == result.history
    assert not list(out.glob(".*.tmp"))  # checkpoint written atomically, no temporary left over
    # The longer run decays its learning rate to lr_final at its own end (it went on below it), and the card
    # counts the training time of both runs.
    assert result2.history[-1]["lr"] == pytest.approx(opts.lr_final)
    assert json.loads((out / "card.json").read_text())["training"]["wall_s"] >= card["training"]["wall_s"]
    # Resuming with another optimizer setting, or fewer epochs than the checkpoint has trained, is refused: the
    # card would record settings the model was mostly not trained with.
    with pytest.raises(DMGuessError, match=r"trained with --lr 0.01 \(now 0.001\), --batch-atoms 12 \(now 6\)"):
        train([data], out, TrainOptions(**{**opts.__dict__, "epochs": 9, "lr": 1e-3, "batch_atoms": 6}), TINY)
    with pytest.raises(DMGuessError, match="has trained 8 epochs, more than --epochs 5: give --epochs 8"):
        train([data], out, TrainOptions(**{**opts.__dict__, "epochs": 5}), TINY)


def test_one_run_or_runs_of_another_split_are_said_so(tmp_path, caplog):
    """One run was "no training structures found" (the random hold-out had taken it); a run recording a split
    other than train or val (a "test", a misspelt "Val") was left out of both without a word."""
    import shutil

    data = dataset("h2o")
    one = tmp_path / "one"
    shutil.copytree(data / "basis", one / "basis")
    shutil.copytree(data / "0000", one / "0000")
    (one / "0000" / "run.json").unlink(missing_ok=True)
    opts = TrainOptions(epochs=1, progress=False)
    with pytest.raises(InputFileError, match="only one run: training needs at least two"):
        train([one], tmp_path / "m", opts, TINY)
    assert not (tmp_path / "m").exists()  # a run refused for its data leaves no empty model folder
    shutil.copytree(data / "0001", one / "0001")
    (one / "0001" / "run.json").write_text(json.dumps({"id": "0001", "split": "Val"}))
    shutil.copytree(data / "0002", one / "0002")
    (one / "0002" / "run.json").unlink(missing_ok=True)
    with caplog.at_level("WARNING", logger="siesta_dmguess.train"):
        train([one], tmp_path / "m2", opts, TINY)
    assert "1 run(s) record a split other than train or val" in caplog.text and "0001" in caplog.text


def test_runs_held_out_at_random_are_in_the_card_and_what_evaluate_scores(tmp_path, capsys, caplog):
    """In a folder whose runs record no split, train holds out a seeded share; the card lists them and evaluate
    scores those by default. It scored every run, the trained-on ones too, with nothing to say so."""
    import shutil

    from siesta_dmguess.cli import main

    data = dataset("h2o")
    mine = tmp_path / "mine"
    shutil.copytree(data / "basis", mine / "basis")
    for run in ("0000", "0001", "0002", "0003", "0005"):
        shutil.copytree(data / run, mine / run)
        (mine / run / "run.json").unlink(missing_ok=True)
    train([mine], tmp_path / "m", TrainOptions(epochs=1, lr=1e-2, batch_atoms=12, progress=False), TINY)
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    held = card["training"]["held_out_runs"]
    assert len(held) == card["training"]["val_structures"] == 1 and Path(held[0]).parent == mine.resolve()
    assert main(["evaluate", str(tmp_path / "m"), str(mine), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1 run(s) held out in training; 4 other run(s) left out" in out
    assert "mean over 1 structure:" in out and Path(held[0]).name in out
    assert main(["evaluate", str(tmp_path / "m"), str(mine), "--quiet", "--split", "all"]) == 0
    assert "mean over 5 structures" in capsys.readouterr().out
    moved = tmp_path / "elsewhere" / "mine"  # the card names the runs by path: a moved folder is said
    shutil.copytree(mine, moved)
    with caplog.at_level("WARNING", logger="siesta_dmguess"):
        assert main(["evaluate", str(tmp_path / "m"), str(moved), "--quiet"]) == 0
    assert "lists runs held out from a folder of this name elsewhere" in caplog.text
    assert "mean over 5 structures" in capsys.readouterr().out


def test_truncated_checkpoint_is_reported_and_training_starts_afresh(tmp_path, caplog):
    """A run killed while writing leaves no usable checkpoint: resuming says which file is unreadable and
    trains from scratch instead of crashing."""
    out = tmp_path / "m"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    opts = TrainOptions(epochs=1, lr=1e-2, batch_atoms=12, max_train=4, progress=False)
    with caplog.at_level("WARNING", logger="siesta_dmguess.train"):
        result = train([dataset("h2o")], out, opts, TINY)
    assert "cannot resume from" in caplog.text and str(out / "checkpoint.pt") in caplog.text
    assert [h["epoch"] for h in result.history] == [0]


def test_density_loss_training_keeps_the_epoch_with_the_best_validation_density(tmp_path):
    """--density-loss trades element error for density error, so the model kept is the one with the lowest
    density loss on the validation structures, not the lowest element MAE."""
    out = tmp_path / "m"
    opts = TrainOptions(epochs=5, lr=2e-2, batch_atoms=12, max_train=8, eval_every=1, progress=False,
                        density_loss=True)
    result = train([dataset("h2o")], out, opts, TINY)
    density = [h["val_density_loss"] for h in result.history]
    assert len(density) == 5 and len(set(density)) == 5
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["best_epoch"] == int(np.argmin(density))
    # what the model was trained with, for anyone reproducing it
    assert card["training"]["software"] == software_versions()
    assert card["training"]["software"]["torch"] == torch.__version__


def test_correction_head_trains_through_the_projection_from_a_trained_model(tmp_path, base):
    """--init + --correction-epochs: the DM model is kept, the ΔH head lowers the projected training error, and
    the saved model's validation error is never worse than the plain projection's."""
    import torch

    from siesta_dmguess.evaluate import evaluate_samples

    data = dataset("h2o")
    opts = TrainOptions(epochs=0, max_train=8, progress=False, init=str(base), correction_epochs=4, eval_every=1,
                        correction_lr=5e-3)
    result = train([data], tmp_path / "corr", opts)
    stage = [h for h in result.history if h.get("stage") == "ΔH"]
    assert len(stage) == 4 and stage[-1]["train_density_error"] < stage[0]["train_density_error"]
    new, old = load_model(tmp_path / "corr"), load_model(base)
    assert new.config.correction_head and not old.config.correction_head
    dm_weights = {k: v for k, v in new.model.state_dict().items() if not k.startswith(("correction_", "novelty_"))}
    assert all(torch.equal(v, old.model.state_dict()[k]) for k, v in dm_weights.items())  # DM model frozen
    card = json.loads((tmp_path / "corr" / "card.json").read_text())
    plain = evaluate_samples(old.model, _val_samples(data, old), overlap=old.overlap)["summary"]["mae"]
    assert card["validation"]["mae"] <= plain + 1e-12
    assert card["training"]["init_model_training"]["train_structures"] == 8
    assert card["training"]["init_model_sha256"] == old.card["weights_sha256"]


def _val_samples(data, loaded):
    from siesta_dmguess.data import load_samples

    return load_samples([data], loaded.config.species, loaded.basis, loaded.config.message_cutoff, split="val")


def test_init_from_a_model_of_other_species_is_a_clear_error(tmp_path):
    from siesta_dmguess.errors import InputFileError

    with pytest.raises(InputFileError, match="--init model 'silicon' has no or another basis for species '[HO]'"):
        train([dataset("h2o")], tmp_path / "m", TrainOptions(epochs=0, progress=False, init="silicon",
                                                             correction_epochs=1))


def test_residual_stage_starts_as_the_frozen_model_and_lowers_its_training_error(tmp_path, base):
    """--init + --add-stage: the new stage is scaled to the init model's training RMS, starts as a no-op, learns
    what the init model leaves over (its training error falls), and every earlier weight stays as it was."""
    import torch

    from siesta_dmguess.data import load_samples
    from siesta_dmguess.evaluate import folded_to_reference, predict_flat
    from siesta_dmguess.train import add_residual_stage

    data = dataset("h2o")
    old = load_model(base)
    samples = load_samples([data], old.config.species, old.basis, old.config.message_cutoff, split="train",
                           max_train=8)
    staged, _ = add_residual_stage(old.model, samples)
    before_all = predict_flat(old.model, samples)
    after = predict_flat(staged.eval(), samples)
    # The new stage starts small: it adds < 1 % (in quadrature) to the frozen model's error.
    err_before = np.concatenate([folded_to_reference(s, f) - s.target_values for s, f in zip(samples, before_all)])
    err_after = np.concatenate([folded_to_reference(s, f) - s.target_values for s, f in zip(samples, after)])
    assert np.linalg.norm(err_after) < 1.01 * np.linalg.norm(err_before)
    result = train([data], tmp_path / "staged", TrainOptions(epochs=8, lr=3e-2, batch_atoms=12, max_train=8,
                                                            progress=False, init=str(base), add_stage=True))
    relative = [h["train_relative_rmse"] for h in result.history]
    assert relative[0] < 1.01 and relative[-1] < 0.97  # starts at the frozen model's error (1), then falls
    new = load_model(tmp_path / "staged")
    residual = np.concatenate([folded_to_reference(s, f) - s.target_values for s, f in zip(samples, before_all)])
    assert new.config.residual_stages == [{"output_scale": pytest.approx(np.sqrt(np.mean(residual**2)), rel=1e-4)}]
    frozen = {k: v for k, v in new.model.state_dict().items() if not k.startswith(("residuals.", "novelty_"))}
    assert all(torch.equal(v, old.model.state_dict()[k]) for k, v in frozen.items())


def test_a_stage_grown_on_other_data_keeps_the_earlier_data_familiar(tmp_path, base):
    """--init M --add-stage on other data: the novelty statistics are refitted on the new data, and the stage keeps
    M's, so M's own structures stay as familiar as M found them (before, the grown model scored the h2o molecules
    by the water8 boxes alone, and refused some of them as far outside its training data). Plain --init, which
    changes the features, drops the kept statistics."""
    from siesta_dmguess.evaluate import evaluate

    def relative_novelty(model_dir):
        result = evaluate(model_dir, [dataset("h2o")], split="val", progress=False)
        return np.array([m["novelty"] for m in result["structures"]]) / result["novelty_threshold"]

    grown = tmp_path / "grown"
    train([dataset("water8")], grown, TrainOptions(epochs=1, lr=1e-3, batch_atoms=24, max_train=2, progress=False,
                                                   init=str(base), add_stage=True))
    before, after = relative_novelty(base), relative_novelty(grown)
    assert np.all(after <= before * (1 + 1e-5))
    # ... while a structure unlike both data sets (a molecule squeezed to 0.55 Å bonds) is still flagged
    from ase import Atoms

    from siesta_dmguess.predict import predict_density_matrix

    squeezed = Atoms("OH2", positions=[[0, 0, 0], [0.55, 0, 0], [-0.14, 0.53, 0]])
    pred = predict_density_matrix(squeezed, str(grown), force=True)
    assert pred.novelty > pred.novelty_threshold
    model = load_model(grown).model
    assert float(model.residuals[0].novelty_threshold) == pytest.approx(float(load_model(base).model.novelty_threshold))
    assert not torch.equal(model.novelty_mean, load_model(base).model.novelty_mean)  # refitted on water8
    wide = tmp_path / "wide"  # a stage of its own width cannot hold the base's statistics: grown all the same
    train([dataset("water8")], wide, TrainOptions(epochs=1, lr=1e-3, batch_atoms=24, max_train=2, progress=False,
                                                  init=str(base), add_stage=True), {"hidden_irreps": "4x0e + 2x1o"})
    assert float(load_model(wide).model.residuals[0].novelty_threshold) == 0.0
    tuned = tmp_path / "tuned"
    train([dataset("water8")], tuned, TrainOptions(epochs=1, lr=1e-3, batch_atoms=24, max_train=2, progress=False,
                                                   init=str(grown)))
    assert float(load_model(tuned).model.residuals[0].novelty_threshold) == 0.0


@pytest.mark.parametrize("options, message", [(dict(density_loss=True, loss_power=4), "use one of the two"),
                                              (dict(loss_power=0.5), "at least 1")])
def test_conflicting_loss_options_are_a_clear_error(tmp_path, options, message):
    from siesta_dmguess.errors import DMGuessError

    with pytest.raises(DMGuessError, match=message):
        train([dataset("h2o")], tmp_path / "m", TrainOptions(epochs=1, progress=False, **options), TINY)
    assert not (tmp_path / "m").exists()  # refused before anything is read or written


@pytest.mark.parametrize("config, message", [({"seed": 3}, "cannot set \\['seed'\\]: use --seed"),
                                             ({"mp_cutof": 3.0}, "unknown model settings \\['mp_cutof'\\]"),
                                             ({"residual_stages": []}, "--add-stage"),
                                             ([3.0], "must be a JSON object"),
                                             ({"mp_cutoff": -1}, "mp_cutoff: must be positive, got -1"),
                                             ({"fold_reach": -2.0}, "fold_reach: must not be negative"),
                                             ({"mp_cutoff": "4"}, "mp_cutoff: must be a number, got '4'"),
                                             ({"avg_num_neighbors": float("nan")}, "must be a number"),
                                             ({"num_layers": 1.5}, "num_layers: must be a whole number"),
                                             ({"feature_norm": 1}, "feature_norm: must be true or false"),
                                             ({"pair_set": "some"}, "pair_set: must be one of pattern, all"),
                                             ({"hidden_irreps": "8x0e + 4x1q"}, "hidden_irreps: is not an irreps"),
                                             ({"pair_irreps": 16}, "pair_irreps: must be an irreps string")])
def test_bad_config_is_a_clear_error_before_anything_is_read(tmp_path, config, message):
    from siesta_dmguess.errors import DMGuessError

    with pytest.raises(DMGuessError, match=message):
        train([tmp_path / "no-data"], tmp_path / "m", TrainOptions(epochs=1, progress=False), config)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("config", [{"mp_cutoff": 3}, {"num_layers": 3, "feature_norm": True, "fold_reach": 0},
                                    {"product_irreps": "", "pair_set": "onsite", "radial_basis": "gaussian"},
                                    {"hidden_irreps": "4x0e + 2x1o + 2x2e"}])
def test_good_config_values_pass_the_check(config):
    from siesta_dmguess.train import check_config_overrides

    check_config_overrides(config)


def test_train_cli_reports_invalid_json_in_config(tmp_path, capsys):
    from siesta_dmguess.cli import main

    assert main(["train", str(tmp_path), "--out", str(tmp_path / "m"), "--config", "{mp_cutoff: 3}"]) == 2
    assert "--config is not valid JSON" in capsys.readouterr().err


def test_add_stage_without_init_is_a_clear_error_before_anything_is_read(tmp_path):
    with pytest.raises(DMGuessError, match="--add-stage needs --init"):
        train([tmp_path / "no-data"], tmp_path / "m", TrainOptions(epochs=1, progress=False, add_stage=True), TINY)


def test_zero_epochs_without_init_is_refused_before_a_model_folder_is_made(tmp_path):
    """It used to write an untrained network with a model card, as if it were a model."""
    with pytest.raises(DMGuessError, match="--epochs 0 trains nothing"):
        train([tmp_path / "no-data"], tmp_path / "m", TrainOptions(epochs=0, progress=False), TINY)
    assert not (tmp_path / "m").exists()


def test_a_stage_can_see_farther_than_the_frozen_networks(tmp_path, base):
    """--add-stage --config '{"mp_cutoff": ...}': the wider cutoff is the new stage's (with its own neighbour
    normalization), the frozen networks keep theirs, and settings that are not a stage's are refused."""
    import torch

    from siesta_dmguess.data import load_samples
    from siesta_dmguess.model import collate
    from siesta_dmguess.train import add_residual_stage

    data = dataset("h2o")
    train([data], tmp_path / "wide", TrainOptions(epochs=1, batch_atoms=12, max_train=4, progress=False,
                                                 init=str(base), add_stage=True), {"mp_cutoff": 4.5})
    wide = load_model(tmp_path / "wide")
    assert wide.config.mp_cutoff == TINY["mp_cutoff"] and wide.config.message_cutoff == 4.5
    assert wide.config.residual_stages[0]["mp_cutoff"] == 4.5 and wide.config.residual_stages[0]["avg_num_neighbors"] > 0
    old = load_model(base)
    samples = load_samples([data], old.config.species, old.basis, 4.5, split="val")[:2]
    # The frozen first network predicts from the wider samples exactly what it predicted before.
    with torch.no_grad():
        for batch in [collate([s], len(old.config.species), torch.float32, with_targets=False) for s in samples]:
            first_network = [m.stage_blocks(m.node_features(batch), batch).numpy() for m in (wide.model, old.model)]
            assert np.allclose(*first_network, atol=1e-6)
    with pytest.raises(DMGuessError, match="not settings of a residual stage"):
        add_residual_stage(old.model, samples, overrides={"fold_reach": 8.0})


def test_density_loss_stage_counts_each_structure_relative_to_the_frozen_model(tmp_path, base):
    """--add-stage --density-loss: the stage is trained by the density loss, each structure's relative to the
    frozen model's own (so the frozen model scores exactly 1 and a near-exact molecule counts as much as a
    box), its training lowers that score, and the epoch kept is the one with the lowest validation score."""
    from siesta_dmguess.data import load_samples
    from siesta_dmguess.train import attach_folded_overlap, structure_density_losses, validation_density_loss

    data = dataset("h2o")
    old = load_model(base)
    samples = load_samples([data], old.config.species, old.basis, old.config.message_cutoff, split="train",
                           max_train=6)
    attach_folded_overlap(samples, old.basis)
    absolute = structure_density_losses(old.model, samples)
    assert len(set(absolute)) == 6 and min(absolute) > 0
    for sample, value in zip(samples, absolute):
        sample.meta["density_reference"] = value
    assert validation_density_loss(old.model, samples) == pytest.approx(1.0, rel=1e-4)
    assert structure_density_losses(old.model, samples) == pytest.approx(absolute, rel=1e-5)  # still absolute

    out = tmp_path / "staged"
    result = train([data], out, TrainOptions(epochs=6, lr=3e-2, batch_atoms=12, max_train=8, eval_every=1,
                                             progress=False, init=str(base), add_stage=True, density_loss=True))
    train_loss = [h["train_relative_density_loss"] for h in result.history]
    val_loss = [h["val_relative_density_loss"] for h in result.history]
    assert train_loss[0] < 1.05 and min(train_loss) < 0.95  # starts at the frozen model's (1), then falls
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["best_epoch"] == int(np.argmin(val_loss))


def test_loss_power_stage_keeps_the_epoch_with_the_lowest_mean_validation_max_error(tmp_path, base):
    """--loss-power 4 fits a stage by mean |error / frozen RMS|^4 per structure (it reports that loss's 4th
    root) and keeps the epoch whose validation structures' largest errors are lowest on average: each
    structure's largest error is what sets SIESTA's first step on it."""
    data = dataset("h2o")
    result = train([data], tmp_path / "p4", TrainOptions(epochs=3, lr=3e-2, batch_atoms=12, max_train=6,
                                                         eval_every=1, progress=False, init=str(base),
                                                         add_stage=True, loss_power=4))
    largest = [h["val_mean_max_abs"] for h in result.history]
    assert len(set(largest)) == 3 and all(h["train_relative_l4"] > 0 for h in result.history)
    assert all(h["val_mean_max_abs"] <= h["val_max_abs"] for h in result.history)
    card = json.loads((tmp_path / "p4" / "card.json").read_text())
    assert card["training"]["best_epoch"] == int(np.argmin(largest))
    assert card["training"]["options"]["loss_power"] == 4


def test_an_onsite_stage_changes_only_the_onsite_blocks_and_lowers_their_error(tmp_path, base):
    """--add-stage --config '{"pair_set": "onsite"}': a stage with no pair readout. It is scaled to the frozen
    model's on-site residual, its loss counts only the elements it can change (so it starts at 1 and falls),
    it keeps the epoch with the lowest mean validation max error, and every pair block stays as it was."""
    import torch

    from siesta_dmguess.data import load_samples
    from siesta_dmguess.evaluate import folded_to_reference, predict_flat

    data = dataset("h2o")
    with pytest.raises(DMGuessError, match="for a residual stage"):
        train([data], tmp_path / "alone", TrainOptions(epochs=1, progress=False), {**TINY, "pair_set": "onsite"})
    result = train([data], tmp_path / "on", TrainOptions(epochs=6, lr=3e-2, batch_atoms=12, max_train=6,
                                                         eval_every=1, progress=False, init=str(base),
                                                         add_stage=True), {"pair_set": "onsite"})
    relative = [h["train_relative_rmse"] for h in result.history]
    assert relative[0] < 1.01 and relative[-1] < 0.97
    card = json.loads((tmp_path / "on" / "card.json").read_text())
    assert card["training"]["best_epoch"] == int(np.argmin([h["val_mean_max_abs"] for h in result.history]))
    old, new = load_model(base), load_model(tmp_path / "on")
    assert new.model.residuals[0].edge_head is None
    samples = load_samples([data], old.config.species, old.basis, old.config.message_cutoff, split="train",
                           max_train=6)
    before, after = predict_flat(old.model, samples), predict_flat(new.model.eval(), samples)
    onsite_error = []
    for s, b, a in zip(samples, before, after):
        onsite = s.layout.element_block < s.layout.n_onsite
        assert np.array_equal(b[~onsite], a[~onsite]) and not np.allclose(b[onsite], a[onsite])
        onsite_error.append([np.linalg.norm((folded_to_reference(s, f) - s.target_values)[s.target_index[onsite]])
                             for f in (b, a)])
    assert np.sum(np.array(onsite_error)[:, 1] ** 2) < np.sum(np.array(onsite_error)[:, 0] ** 2)
    assert new.config.residual_stages[0]["pair_set"] == "onsite" and torch.is_tensor(
        new.model.residuals[0].node_head.weight)


def test_max_train_reads_only_the_training_runs_it_keeps(tmp_path, monkeypatch):
    """``--max-train N`` on a folder with a val split reads its first N training runs and every val run, the
    structures training keeps (the others are not read at all, neither for the basis nor for the samples);
    without a val split every run is read, because the hold-out is drawn from all of them."""
    import shutil

    import siesta_dmguess.structure
    from siesta_dmguess.data import list_runs, load_samples
    from siesta_dmguess.train import dataset_basis

    data = dataset("h2o")
    runs = list_runs(data)
    expected = [r for r in runs if r.split == "train"][:3] + [r for r in runs if r.split == "val"]
    read, read_structure = [], siesta_dmguess.structure.read_structure
    monkeypatch.setattr(siesta_dmguess.structure, "read_structure", lambda p: read.append(p) or read_structure(p))
    basis = dataset_basis([data], max_train=3)
    assert sorted(str(p.parent) for p in read) == sorted(str(r.folder) for r in expected)
    monkeypatch.undo()
    samples = load_samples([data], ["H", "O"], basis, 3.0, max_train=3)
    assert sorted(s.name for s in samples) == sorted(str(r.folder) for r in expected)
    assert [s.name for s in load_samples([data], ["H", "O"], basis, 3.0, split="train", max_train=2)] == \
        [str(r.folder) for r in expected[:2]]
    folder = tmp_path / "no-split"  # four runs and no index.json: all four are read
    for r in runs[:4]:
        shutil.copytree(r.folder, folder / r.id)
    shutil.copytree(data / "basis", folder / "basis")
    assert len(load_samples([folder], ["H", "O"], basis, 3.0, max_train=1)) == 4


def test_the_card_records_the_training_fdfs_other_basis_options(tmp_path):
    """Runs made with a basis option beyond PAO.BasisSize and PAO.EnergyShift (here a split norm other than SIESTA's
    0.15; only the fdfs say so, the DMs are the dataset's) give a card that records it: predict takes runs written the
    same way and refuses those without."""
    import shutil

    from siesta_dmguess.errors import ModelCompatibilityError
    from siesta_dmguess.predict import predict_density_matrix

    source = dataset("h2o")
    data = tmp_path / "h2o-split"
    shutil.copytree(source / "basis", data / "basis")
    for run in ("0000", "0001", "0002", "0004"):
        shutil.copytree(source / run, data / run)
        fdf = data / run / "input.fdf"
        fdf.write_text(fdf.read_text() + "PAO.SplitNorm 0.25\n")
    train([data], tmp_path / "m", TrainOptions(epochs=1, batch_atoms=12, progress=False), TINY)
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    assert card["basis_options"] == {"PAO.SplitNorm": "0.25"}
    assert "| basis_options | {'PAO.SplitNorm': '0.25'} |" in (tmp_path / "m" / "card.md").read_text()
    predict_density_matrix(data / "0004" / "input.fdf", tmp_path / "m")
    plain = tmp_path / "plain.fdf"
    shutil.copy(source / "0004" / "input.fdf", plain)
    with pytest.raises(ModelCompatibilityError, match=r"trained with PAO.SplitNorm \(0.25\), which shapes the basis "
                                                     r"and this fdf leaves at SIESTA's default \(0.15\)"):
        predict_density_matrix(plain, tmp_path / "m")


def test_runs_made_with_other_settings_are_refused_before_training(tmp_path, base):
    """A card records one set of settings: a training run made with another functional (or basis setting) than
    the first run, or than the --init model's, is named before any training (it was learned under the first
    run's label, an LDA card over GGA DMs)."""
    import shutil

    source = dataset("h2o")
    data = tmp_path / "mixed"
    shutil.copytree(source / "basis", data / "basis")
    for run in ("0000", "0001", "0004"):
        shutil.copytree(source / run, data / run)
    fdf = data / "0001" / "input.fdf"
    fdf.write_text(fdf.read_text().replace("XC.functional LDA", "XC.functional GGA").replace("XC.authors CA",
                                                                                             "XC.authors PBE"))
    opts = TrainOptions(epochs=1, batch_atoms=12, progress=False)
    with pytest.raises(InputFileError, match=r"0001: made with other settings than the model.s data: fdf setting "
                                             r"XC.functional is 'GGA', .*0000 \(the first run\) has 'LDA'"):
        train([data], tmp_path / "m", opts, TINY)
    assert not (tmp_path / "m" / "weights.pt").exists()
    shutil.rmtree(data / "0000"), shutil.rmtree(data / "0004")
    with pytest.raises(InputFileError, match="XC.functional is 'GGA', the --init model was trained with 'LDA'"):
        train([data], tmp_path / "m2", TrainOptions(epochs=1, batch_atoms=12, progress=False, init=str(base),
                                                    add_stage=True), {})


def test_a_stopped_training_is_not_thrown_away_by_a_run_that_cannot_resume_it(tmp_path, base):
    """A probe ran a stopped 55-epoch training's command again with another --seed, or after adding a run: the
    checkpoint was replaced with only a warning ("another configuration; starting afresh"). Refused now, saying
    what differs; and so is a finished model, which said only "another configuration or other data"."""
    import shutil

    stopped = tmp_path / "stopped"
    shutil.copytree(base, stopped)
    for name in ("weights.pt", "config.json", "card.json", "card.md"):
        (stopped / name).unlink(missing_ok=True)  # what a killed training leaves: its checkpoint
    checkpoint = (stopped / "checkpoint.pt").read_bytes()
    opts = dict(epochs=3, lr=1e-2, batch_atoms=12, progress=False)
    with pytest.raises(DMGuessError, match=r"stopped training \(checkpoint.pt, 3 epochs\).*other settings: seed 0 "
                                           r"\(now 5\).*--restart"):
        train([dataset("h2o")], stopped, TrainOptions(**opts, max_train=8, seed=5), TINY)
    with pytest.raises(DMGuessError, match=r"stopped training .*other training data \(.*onsite_reference"):
        train([dataset("h2o")], stopped, TrainOptions(**opts, max_train=10), TINY)
    assert (stopped / "checkpoint.pt").read_bytes() == checkpoint
    with pytest.raises(DMGuessError, match=r"holds a model that this training run cannot resume \(other settings: "
                                           r"num_layers"):
        train([dataset("h2o")], base, TrainOptions(**opts, max_train=8), {**TINY, "num_layers": 3})


def test_a_model_is_not_written_into_a_data_folder(tmp_path):
    """A probe's `train DATA --out DATA` wrote the model's files among its runs."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset("h2o") / "0000", data / "0000")
    shutil.copytree(dataset("h2o") / "0004", data / "0004")
    opts = TrainOptions(epochs=1, batch_atoms=12, progress=False)
    with pytest.raises(DMGuessError, match="data: is one of the training data folders"):
        train([data], data, opts, TINY)
    with pytest.raises(DMGuessError, match=r"0004: holds SIESTA runs"):
        train([data / "0000"], data / "0004", opts, TINY)
    assert sorted(p.name for p in data.iterdir()) == ["0000", "0004"]


def test_runs_without_a_split_beside_a_val_split_are_partly_held_out_too():
    """A probe trained on h2o (with a val split) and ten g2 runs that recorded none: all ten were trained on and
    no carbon was validated, where docs/models.md says a seeded 20 % of such runs is held out."""
    from types import SimpleNamespace

    from siesta_dmguess.train import _split

    runs = [SimpleNamespace(name=f"h2o/{k}", meta={"split": "train"}) for k in range(8)]
    runs += [SimpleNamespace(name=f"h2o/v{k}", meta={"split": "val"}) for k in range(2)]
    runs += [SimpleNamespace(name=f"g2/{k}", meta={"split": ""}) for k in range(10)]
    train_set, val_set = _split(runs, TrainOptions(seed=3))
    held = [s.name for s in val_set if s.name.startswith("g2/")]
    assert len(held) == 2 and {s.name for s in val_set} >= {"h2o/v0", "h2o/v1"}
    assert len(train_set) == 16 and not set(held) & {s.name for s in train_set}
    assert all(s.name.startswith("h2o/") or s.name not in held for s in train_set)
    # recorded splits alone are kept as they are
    train_set, val_set = _split(runs[:10], TrainOptions(seed=3))
    assert [s.name for s in val_set] == ["h2o/v0", "h2o/v1"] and len(train_set) == 8


def test_training_folders_with_different_pseudopotentials_for_one_species_are_refused_before_training(tmp_path):
    """A probe trained on h2o and a copy of runs with another H.psf: the card recorded the last folder's checksum,
    and the guard then refused the first folder's kind of run."""
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(dataset("h2o") / "basis", other / "basis")
    for run in ("0000", "0004"):
        shutil.copytree(dataset("h2o") / run, other / run)
    (other / "index.json").write_text(json.dumps([{"id": "0000", "split": "train"}, {"id": "0004", "split": "val"}]))
    psf = other / "basis" / "H.psf"
    psf.write_text(psf.read_text() + "\n")  # another file: another checksum
    with pytest.raises(InputFileError, match=r"other/basis/H.psf: differs from .*h2o/basis/H.psf, the "
                                             r"pseudopotential of species 'H'"):
        train([dataset("h2o"), other], tmp_path / "m", TrainOptions(epochs=1, batch_atoms=12, progress=False), TINY)
    assert not (tmp_path / "m").exists()


def test_a_finished_model_is_not_replaced_by_a_run_that_cannot_resume_it(tmp_path, base):
    """--out naming a folder that holds another model (other data or configuration) is refused before training,
    unless --restart; growing the --init model in its own folder (--add-stage) is allowed."""
    import shutil

    out = tmp_path / "m"
    shutil.copytree(base, out)  # a finished h2o model, with its checkpoint
    weights = (out / "weights.pt").read_bytes()
    opts = TrainOptions(epochs=1, batch_atoms=12, max_train=2, progress=False)
    with pytest.raises(DMGuessError, match=r"m: holds a model that this training run cannot resume .* --restart"):
        train([dataset("h2o")], out, opts, {**TINY, "num_layers": 3})
    (out / "checkpoint.pt").unlink()  # a copied model without its checkpoint cannot be resumed either
    with pytest.raises(DMGuessError, match="cannot resume"):
        train([dataset("h2o")], out, opts, TINY)
    assert (out / "weights.pt").read_bytes() == weights
    train([dataset("h2o")], out, TrainOptions(epochs=1, batch_atoms=12, max_train=2, progress=False, init=str(out),
                                              add_stage=True), {})
    assert len(load_model(out).config.residual_stages) == 1
    train([dataset("h2o")], out, opts, TINY, resume=False)  # --restart: replaced on purpose
    assert load_model(out).config.residual_stages == []


def test_species_in_no_training_structure_or_a_head_without_projections_are_refused_before_training(tmp_path):
    """A species only in validation runs (or past --max-train) got a model that claimed it, with a novelty of
    nothing that scored its structures as familiar; --correction-epochs on k-point data failed only after the
    whole DM training, whose checkpoint (of a config with a ΔH head) no rerun without the option resumes."""
    import shutil

    h2o, si8 = dataset("h2o"), dataset("si8")
    mixed = tmp_path / "mixed"
    for data, runs in ((h2o, ("0000", "0001")), (si8, ("0004",))):
        shutil.copytree(data / "basis", mixed / "basis", dirs_exist_ok=True)
        for run in runs:
            shutil.copytree(data / run, mixed / f"{data.name}-{run}")
    (mixed / "si8-0004" / "run.json").write_text(json.dumps({"split": "val"}))
    for name in ("h2o-0000", "h2o-0001"):
        (mixed / name / "run.json").write_text(json.dumps({"split": "train"}))
    with pytest.raises(InputFileError, match=r"species \['Si'\] are in no training structure"):
        train([mixed], tmp_path / "m", TrainOptions(epochs=1, progress=False), TINY)
    assert not (tmp_path / "m").exists()
    kpoints = tmp_path / "si"
    shutil.copytree(si8 / "basis", kpoints / "basis")
    for run in ("0000", "0004"):
        shutil.copytree(si8 / run, kpoints / run)
    with pytest.raises(InputFileError, match="--correction-epochs: no training structure gets the dense projection"):
        train([kpoints], tmp_path / "c", TrainOptions(epochs=1, correction_epochs=1, progress=False), TINY)
    assert not (tmp_path / "c").exists()  # refused before the DM training wrote a checkpoint
    with pytest.raises(InputFileError, match="--density-loss: no training structure is folded"):  # silently MSE
        train([kpoints], tmp_path / "d", TrainOptions(epochs=1, density_loss=True, progress=False), TINY)


def test_the_card_records_the_train_command_as_given_to_main(tmp_path, monkeypatch):
    """The card's training command is the one `main` was given (it was the calling process's sys.argv: a script
    or test calling `main([...])` recorded its own command line)."""
    import siesta_dmguess.train as train_module
    from siesta_dmguess.cli import main

    given = []
    monkeypatch.setattr(train_module, "train", lambda *a, command=None, **k: given.append(command) or
                        (_ for _ in ()).throw(SystemExit(0)))
    monkeypatch.setattr("sys.argv", ["pytest", "-k", "something"])
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path), "--out", str(tmp_path / "my model"), "--epochs", "3"])
    assert given == [f"siesta-dmguess train {tmp_path} --out '{tmp_path / 'my model'}' --epochs 3"]


def test_the_card_records_every_mesh_cutoff_of_the_training_runs():
    """MeshCutoff is left free (it does not change the basis), so runs of several meshes train one model: the card
    listed the first run's alone. It lists them all where they differ, and `models` shows them."""
    from types import SimpleNamespace

    from siesta_dmguess.cli import model_settings_summary
    from siesta_dmguess.train import settings_record

    def run(mesh):
        return SimpleNamespace(structure=SimpleNamespace(fdf_settings={"XC.functional": "LDA", "MeshCutoff": mesh}))

    same = [run("200 Ry"), run("200 Ry")]
    assert settings_record(same[0].structure.fdf_settings, same)["siesta_settings"] == {"MeshCutoff": "200 Ry"}
    mixed = [run("1000 Ry"), run("200 Ry"), run("1000 Ry")]
    card = settings_record(mixed[0].structure.fdf_settings, mixed)
    assert card["siesta_settings"]["MeshCutoff"] == ["200 Ry", "1000 Ry"]  # in order of size, not of text
    assert model_settings_summary(card).endswith("trained at MeshCutoff 200 Ry, 1000 Ry (not checked)")
    unset = [run("200 Ry"), SimpleNamespace(structure=SimpleNamespace(fdf_settings={}))]
    assert settings_record({}, unset)["siesta_settings"]["MeshCutoff"] == ["200 Ry", "300 Ry"]  # SIESTA 4.1's default
