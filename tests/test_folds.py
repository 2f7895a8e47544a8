import numpy as np
import pandas as pd
import pytest

from comp import config, data, folds
from comp.errors import CompError


def test_stratified_every_row_once_and_seeded():
    y = np.array([0] * 50 + [1] * 30 + [2] * 20)
    f = folds.make_folds(y, 5, seed=1)
    assert set(f) == set(range(5))
    for k in range(5):
        assert np.bincount(y[f == k], minlength=3).tolist() == [10, 6, 4]
    assert np.array_equal(f, folds.make_folds(y, 5, seed=1))
    assert not np.array_equal(f, folds.make_folds(y, 5, seed=2))


def test_class_smaller_than_n_splits():
    with pytest.raises(CompError, match="class 2 has 3 row"):
        folds.make_folds(np.array([0] * 10 + [1] * 10 + [2] * 3), 5, seed=0)


def test_fingerprint():
    ids, labels = np.array(["a", "b", "c"]), np.array(["x", "y", "x"])
    fp = folds.fingerprint(ids, labels, 5, 0)
    assert fp == folds.fingerprint(ids[::-1], labels[::-1], 5, 0)
    assert fp != folds.fingerprint(ids, np.array(["x", "y", "y"]), 5, 0)
    assert fp != folds.fingerprint(ids, labels, 4, 0) != folds.fingerprint(ids, labels, 5, 1)


def test_cli_writes_split_and_later_stages_check_it(project, capsys):
    assert folds.main(["--config", str(project)]) == 0
    table = pd.read_csv(project.parent / "folds" / "folds.csv")
    assert list(table.columns) == ["id", "fold"] and len(table) == 90
    cfg = config.load(project)
    comp = data.load_competition(cfg)
    f, fp = folds.load_folds(cfg, comp)
    assert np.array_equal(f, table["fold"].to_numpy())

    train_csv = project.parent / "data" / "train.csv"
    original = pd.read_csv(train_csv)
    original.iloc[:-1].to_csv(train_csv, index=False)  # a row removed
    with pytest.raises(CompError, match="1 removed"):
        folds.load_folds(cfg, data.load_competition(cfg))
    original.assign(label=np.roll(original["label"], 1)).to_csv(train_csv, index=False)  # relabelled
    with pytest.raises(CompError, match="labels changed"):
        folds.load_folds(cfg, data.load_competition(cfg))
    with pytest.raises(CompError, match="n_splits=3"):
        folds.load_folds(config.load(project, ["folds.n_splits=4"]), comp)


def test_folds_missing_is_a_clear_order_error(project):
    cfg = config.load(project)
    with pytest.raises(CompError, match="make folds"):
        folds.load_folds(cfg, data.load_competition(cfg))
