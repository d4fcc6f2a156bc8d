"""Training end to end on a few shared structures: files, card, learning, resume."""

import json

import pytest

from siesta_dmguess.card import load_model, sha256_file
from siesta_dmguess.train import TrainOptions, train

from .conftest import dataset

TINY = {"hidden_irreps": "8x0e + 4x1o + 2x1e + 4x2e + 2x2o + 2x3o + 2x3e + 1x4e",
        "pair_irreps": "4x0e + 2x1o + 2x1e + 2x2e + 2x2o", "radial_hidden": 16, "mp_cutoff": 3.0}


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
    assert [h["epoch"] for h in result2.history] == list(range(8))
    assert result2.history[:6] == result.history
