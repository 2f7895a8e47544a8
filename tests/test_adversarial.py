"""Adversarial validation: an AUC near 0.5 when train and test come from one table, near 1 when the test rows
carry a marker (which heads the features that give them away); each training row's score is written."""

import json

import numpy as np
import pandas as pd
import pytest

from comp import adversarial, config
from comp.errors import CompError
from tests.conftest import assert_user_error, make_tables, snapshot, write_project


def project_with(tmp_path, tiny_model, marker: str = ""):
    t = make_tables(n_train=300, n_test=300, seed=3)
    if marker:
        t["test.csv"]["body"] = t["test.csv"]["body"] + f" {marker}"
    return write_project(tmp_path, tiny_model, t)


def test_one_table_split_at_random_scores_near_half(tmp_path, tiny_model):
    cfg = config.load(project_with(tmp_path, tiny_model))
    record = adversarial.adversarial(cfg)
    assert 0.4 < record["auc"] < 0.6
    scores = pd.read_csv(tmp_path / "folds" / "adversarial.csv")
    assert len(scores) == 300 and scores["p_test"].between(0, 1).all()


def test_a_marked_test_table_scores_near_one_and_names_the_marker(tmp_path, tiny_model):
    cfg = config.load(project_with(tmp_path, tiny_model, marker="zzqmarker"))
    record = adversarial.adversarial(cfg)
    assert record["auc"] > 0.95
    assert any("zzqmarker" in t["feature"] and t["weight"] > 0 for t in record["top_features"][:3])
    assert json.loads((tmp_path / "folds" / "adversarial.json").read_text())["auc"] == pytest.approx(record["auc"])


def test_missing_test_file_is_one_line(project, capsys):
    (project.parent / "data" / "test.csv").unlink()
    before = snapshot(project.parent)
    assert_user_error(adversarial.main(["--config", str(project)]), capsys, "test file", "not found")
    assert snapshot(project.parent) == before


def test_the_report_shows_it(tmp_path, tiny_model):
    from comp import folds, report, submit, train

    cfg_path = project_with(tmp_path, tiny_model, marker="zzqmarker")
    args = ["--config", str(cfg_path), "--set", "model.kind=linear"]
    assert folds.main(args) == 0 and train.main([*args, "--all"]) == 0 and submit.main(args) == 0
    page = (tmp_path / "reports" / "tiny" / "index.html").read_text()
    assert "adversarial validation" not in page
    assert adversarial.main(["--config", str(cfg_path)]) == 0 and report.main(args) == 0
    page = (tmp_path / "reports" / "tiny" / "index.html").read_text()
    assert "adversarial validation" in page and "zzqmarker" in page


def test_folds_stratify_on_the_test_likeness_when_asked(tmp_path, tiny_model, capsys):
    from comp import folds
    from comp.tables import read as tables
    from comp.tables import splits

    t = make_tables(n_train=300, n_test=300, seed=3)
    marked = t["train.csv"].index % 3 == 0  # a third of the training rows look like the test rows
    t["train.csv"].loc[marked, "body"] += " zzqmarker"
    t["test.csv"]["body"] += " zzqmarker"
    path = write_project(tmp_path, tiny_model, t)
    before = snapshot(tmp_path)
    code = folds.main(["--config", str(path), "--set", "folds.adversarial=true"])
    assert_user_error(code, capsys, "folds.adversarial", "python -m comp.adversarial")
    assert snapshot(tmp_path) == before
    adversarial.adversarial(config.load(path))
    assert folds.main(["--config", str(path), "--set", "folds.adversarial=true", "--set", "folds.n_splits=6"]) == 0
    cfg = config.load(path, ["folds.adversarial=true", "folds.n_splits=6"])
    comp = tables.load_competition(cfg)
    fold, _ = splits.load_folds(cfg, comp)
    bins = splits.adversarial_bins(cfg, comp)
    top = bins == bins.max()
    assert top.sum() == 100 and marked[top].mean() > 0.9  # the test-like tercile is the marked rows
    per_fold = np.bincount(fold[top], minlength=6)
    assert per_fold.max() - per_fold.min() <= 3  # one row per class at most between folds
    pd.DataFrame({"id": comp.train_ids, "p_test": 1 - bins / 3}).to_csv(tmp_path / "folds" / "adversarial.csv", index=False)
    with pytest.raises(CompError, match="adversarial.csv changed"):
        splits.load_folds(cfg, comp)
    with pytest.raises(CompError, match="adversarial=True"):
        splits.load_folds(config.load(path, ["folds.n_splits=6"]), comp)
