import numpy as np
import pandas as pd
import pytest

from comp import config, folds, splits, tables
from comp.errors import CompError


def test_stratified_every_row_once_and_seeded():
    y = np.array([0] * 50 + [1] * 30 + [2] * 20)
    f = splits.make_folds(y, 5, seed=1)
    assert set(f) == set(range(5))
    for k in range(5):
        assert np.bincount(y[f == k], minlength=3).tolist() == [10, 6, 4]
    assert np.array_equal(f, splits.make_folds(y, 5, seed=1))
    assert not np.array_equal(f, splits.make_folds(y, 5, seed=2))


def test_class_smaller_than_n_splits():
    with pytest.raises(CompError, match="class 2 has 3 row"):
        splits.make_folds(np.array([0] * 10 + [1] * 10 + [2] * 3), 5, seed=0)


def test_fingerprint():
    ids, labels = np.array(["a", "b", "c"]), np.array(["x", "y", "x"])
    fp = splits.fingerprint(ids, labels, 5, 0)
    assert fp == splits.fingerprint(ids[::-1], labels[::-1], 5, 0)
    assert fp != splits.fingerprint(ids, np.array(["x", "y", "y"]), 5, 0)
    assert fp != splits.fingerprint(ids, labels, 4, 0) != splits.fingerprint(ids, labels, 5, 1)


def test_cli_writes_split_and_later_stages_check_it(project, capsys):
    assert folds.main(["--config", str(project)]) == 0
    table = pd.read_csv(project.parent / "folds" / "folds.csv")
    assert list(table.columns) == ["id", "fold"] and len(table) == 90
    cfg = config.load(project)
    comp = tables.load_competition(cfg)
    f, fp = splits.load_folds(cfg, comp)
    assert np.array_equal(f, table["fold"].to_numpy())

    train_csv = project.parent / "data" / "train.csv"
    original = pd.read_csv(train_csv)
    original.iloc[:-1].to_csv(train_csv, index=False)  # a row removed
    with pytest.raises(CompError, match="1 removed"):
        splits.load_folds(cfg, tables.load_competition(cfg))
    original.assign(label=np.roll(original["label"], 1)).to_csv(train_csv, index=False)  # relabelled
    with pytest.raises(CompError, match="labels changed"):
        splits.load_folds(cfg, tables.load_competition(cfg))
    with pytest.raises(CompError, match="n_splits=3"):
        splits.load_folds(config.load(project, ["folds.n_splits=4"]), comp)


def test_folds_missing_is_a_clear_order_error(project):
    cfg = config.load(project)
    with pytest.raises(CompError, match="make folds"):
        splits.load_folds(cfg, tables.load_competition(cfg))
