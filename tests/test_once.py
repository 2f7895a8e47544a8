"""Work done once, however many folds read it: the tables' fingerprints per loaded competition, each fold's
scores per submit."""

from comp import folds, submit, train
from comp.tables import identity
from tests.conftest import write_project


def test_the_tables_are_fingerprinted_once_for_every_fold_of_a_run(tmp_path, tiny_model, monkeypatch):
    cfg = write_project(tmp_path, tiny_model)
    assert folds.main(["--config", str(cfg), "--quiet"]) == 0
    calls = []
    real = identity.table_digest
    monkeypatch.setattr(identity, "table_digest", lambda *a: calls.append(1) or real(*a))
    assert train.main(["--config", str(cfg), "--all", "--quiet", "--set", "train.epochs=1"]) == 0
    assert len(calls) == 2  # the training table and the test table, for three folds


def test_the_report_takes_the_fold_scores_that_submit_computed(tmp_path, tiny_model, monkeypatch):
    from comp import metrics

    cfg = write_project(tmp_path, tiny_model)
    assert folds.main(["--config", str(cfg), "--quiet"]) == 0
    assert train.main(["--config", str(cfg), "--all", "--quiet", "--set", "model.kind=linear"]) == 0
    calls = []
    real = metrics.score
    monkeypatch.setattr(metrics, "score", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = submit.submit(__import__("comp.config", fromlist=["load"]).load(cfg, ["model.kind=linear"]))
    assert len(calls) == len(result["folds"]) + 1  # each fold once, then the CV
