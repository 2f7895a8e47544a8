import numpy as np
import pandas as pd
import pytest

from comp import config, folds
from comp.errors import CompError
from comp.tables import read as tables
from comp.tables import splits


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


def _grouped(project, values):
    """The project's training table with an 'author' column, and folds.group naming it."""
    train = project.parent / "data" / "train.csv"
    table = pd.read_csv(train)
    table.assign(author=values(len(table))).to_csv(train, index=False)
    project.write_text(project.read_text().replace("[folds]", '[folds]\ngroup = "author"'))


def test_a_group_never_spans_two_folds_and_labels_stay_stratified(project):
    _grouped(project, lambda n: [f"a{i % 23}" for i in range(n)])
    assert folds.main(["--config", str(project), "--quiet"]) == 0
    cfg = config.load(project)
    comp = tables.load_competition(cfg)
    f, fp = splits.load_folds(cfg, comp)
    by_group = pd.DataFrame({"author": comp.train["author"], "fold": f}).groupby("author")["fold"].nunique()
    assert (by_group == 1).all() and set(f) == {0, 1, 2}
    shares = [np.bincount(comp.y[f == k], minlength=3) / (f == k).sum() for k in range(3)]
    assert np.abs(np.array(shares) - np.bincount(comp.y) / len(comp.y)).max() < 0.15
    assert fp != splits.fingerprint(comp.train_ids, np.array(comp.classes)[comp.y], 3, cfg.folds.seed)
    _grouped(project, lambda n: [f"b{i % 23}" for i in range(n)])  # other groups: the split is stale
    with pytest.raises(CompError, match="groups changed"):
        splits.load_folds(cfg, tables.load_competition(cfg))


@pytest.mark.parametrize(("values", "needle"), [
    (lambda n: [None if i == 4 else f"a{i % 9}" for i in range(n)], "missing value"),
    (lambda n: [f"a{i % 2}" for i in range(n)], "2 distinct value"),
])
def test_bad_group_columns_are_one_line_and_write_nothing(project, capsys, values, needle):
    from tests.conftest import assert_user_error, snapshot

    _grouped(project, values)
    before = snapshot(project.parent)
    assert_user_error(folds.main(["--config", str(project)]), capsys, "folds.group", needle)
    assert snapshot(project.parent) == before


def test_an_imported_split_is_used_as_given_and_fingerprinted(project, tmp_path):
    train = pd.read_csv(project.parent / "data" / "train.csv")
    own = pd.DataFrame({"id": train["id"], "fold": np.arange(len(train)) % 3}).sample(frac=1, random_state=0)
    own.to_csv(tmp_path / "mine.csv", index=False)
    assert folds.main(["--config", str(project), "--quiet", "--from", str(tmp_path / "mine.csv")]) == 0
    cfg = config.load(project)
    comp = tables.load_competition(cfg)
    f, fp = splits.load_folds(cfg, comp)
    assert np.array_equal(f, own.set_index(own["id"].astype(str)).loc[comp.train_ids, "fold"].to_numpy())
    other = own.assign(fold=np.roll(own["fold"].to_numpy(), 1))
    other.to_csv(tmp_path / "other.csv", index=False)
    assert folds.main(["--config", str(project), "--quiet", "--from", str(tmp_path / "other.csv")]) == 0
    assert splits.load_folds(cfg, comp)[1] != fp  # another assignment, another fingerprint


BAD_SPLITS = {
    "a missing row": (lambda t: t.iloc[1:], "misses 1 training row"),
    "an unknown id": (lambda t: pd.concat([t, pd.DataFrame({"id": ["nope"], "fold": [0]})]), "not in train"),
    "a fold out of range": (lambda t: t.assign(fold=t["fold"].where(t.index > 0, 7)), "folds.n_splits = 3"),
    "a fold that is no number": (lambda t: t.assign(fold=t["fold"].astype(object).where(t.index > 0, "x")),
                                 "not a whole number"),
    "a duplicate id": (lambda t: pd.concat([t, t.iloc[:1]]), "more than once"),
}


@pytest.mark.parametrize("case", BAD_SPLITS)
def test_a_bad_imported_split_is_one_line_and_writes_nothing(project, tmp_path, capsys, case):
    from tests.conftest import assert_user_error, snapshot

    edit, needle = BAD_SPLITS[case]
    train = pd.read_csv(project.parent / "data" / "train.csv")
    edit(pd.DataFrame({"id": train["id"], "fold": np.arange(len(train)) % 3})).to_csv(tmp_path / "s.csv", index=False)
    before = snapshot(project.parent)
    assert_user_error(folds.main(["--config", str(project), "--from", str(tmp_path / "s.csv")]), capsys, needle)
    assert snapshot(project.parent) == before
