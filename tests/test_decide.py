"""The metric registry against scikit-learn, and decision rules fitted honestly (--decide)."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, log_loss

from comp import export, metrics, predict, submit
from comp.outputs import decide
from tests.conftest import assert_user_error, own_copy, snapshot, trained_project


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """The tiny project with every fold trained (each test works on its own copy)."""
    return trained_project(tmp_path_factory.mktemp("decide"), tiny_model)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_metric_matches_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, size=300)
    y[y == 4] = 3  # class 4 never true
    logits = rng.normal(size=(300, 5))
    pred = logits.argmax(1)
    got = metrics.score(y, logits)
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert got["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=range(5), zero_division=0))
    assert got["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic", labels=range(5)))
    probs = metrics.probabilities(logits)
    assert got["log_loss"] == pytest.approx(log_loss(y, probs, labels=range(5)))
    assert set(metrics.names("single_label", 5)) == set(got) and set(got) <= set(metrics.DIRECTION)


def _underpredicted(seed=0, n=600):
    """Probabilities that are right about the order of most rows but shrink class 2, so argmax misses it."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    logits = rng.normal(size=(n, 3)) + 2.0 * np.eye(3)[y]
    probs = metrics.probabilities(logits) * np.array([1.0, 1.0, 0.15])
    return y, probs / probs.sum(1, keepdims=True)


def test_the_rule_raises_the_metric_by_weighting_the_shrunk_class_up():
    y, probs = _underpredicted()
    rule = decide.fit(y, probs, "macro_f1")
    w = rule["weights"]
    before = metrics.macro_f1(metrics.confusion(y, probs.argmax(1), 3))
    after = metrics.macro_f1(metrics.confusion(y, decide.labels_of(probs, rule), 3))
    assert rule["kind"] == "weights" and w[0] == 1.0 and w[2] > 2.0 and after > before + 0.05


def test_qwk_cuts_the_expected_rating_where_the_metric_is_highest():
    """Ratings whose predicted distributions are pulled to the middle: rounding the expected rating rarely says
    1 or 5, and cut points moved inwards fix that."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, size=800)
    logits = -0.5 * (np.arange(5)[None, :] - (2 + 0.5 * (y[:, None] - 2) + rng.normal(0, 0.4, (800, 1)))) ** 2
    probs = metrics.probabilities(logits)
    rule = decide.fit(y, probs, "qwk")
    before = metrics.qwk(metrics.confusion(y, probs.argmax(1), 5))
    after = metrics.qwk(metrics.confusion(y, decide.labels_of(probs, rule), 5))
    assert rule["kind"] == "cuts" and list(rule["cuts"]) == sorted(rule["cuts"]) and after > before + 0.02
    assert rule["cuts"][0] > 0.5 and rule["cuts"][-1] < 3.5  # the outer cuts moved inwards


def test_fold_ks_rule_never_sees_fold_ks_rows():
    y, probs = _underpredicted()
    folds = np.arange(len(y)) % 3
    _, rules = decide.cross_fit(y, folds, probs, "macro_f1")
    changed = probs.copy()
    changed[folds == 0] = np.roll(changed[folds == 0], 1, axis=1)  # fold 0's OOF rows, scrambled
    _, again = decide.cross_fit(y, folds, changed, "macro_f1")
    assert rules[0] == again[0]  # fitted on folds 1 and 2 only
    assert rules[1:] != again[1:]


def test_submit_decide_writes_the_rule_and_predict_and_bundles_apply_it(trained, tmp_path, capsys):
    cfg = own_copy(trained, tmp_path)
    data = cfg.parent / "data"
    assert submit.main(["--config", str(cfg), "--decide"]) == 0
    out = capsys.readouterr().out
    assert "decide: CV macro_f1" in out
    rule = json.loads((cfg.parent / "folds" / "tiny" / "decision.json").read_text())
    assert rule["metric"] == "macro_f1" and len(rule["weights"]) == 3 and len(rule["fold_rules"]) == 3
    written = pd.read_csv(cfg.parent / "submissions" / "tiny.csv")
    args = ["--test", str(data / "test.csv"), "--sample", str(data / "sample_submission.csv")]
    assert predict.main(["--config", str(cfg), "--quiet", "--out", str(tmp_path / "p.csv"), *args]) == 0
    assert pd.read_csv(tmp_path / "p.csv").equals(written)
    assert export.main(["--config", str(cfg), "--quiet", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["decision"]["weights"] == rule["weights"]
    assert predict.main(["--quiet", "--bundle", str(tmp_path / "b"), "--out", str(tmp_path / "q.csv"), *args]) == 0
    assert pd.read_csv(tmp_path / "q.csv").equals(written)
    assert submit.main(["--config", str(cfg)]) == 0  # a plain submit drops the rule
    assert not (cfg.parent / "folds" / "tiny" / "decision.json").exists()


@pytest.mark.parametrize("case", ["probability metric", "probability submission"])
def test_decide_where_it_cannot_apply_is_one_line_and_writes_nothing(trained, tmp_path, capsys, case):
    cfg = own_copy(trained, tmp_path)
    extra = ["--set", "data.metric=log_loss", "--set", "train.loss=balanced_ce"]
    if case == "probability submission":
        sample = pd.read_csv(cfg.parent / "data" / "sample_submission.csv")[["id"]].assign(**{c: 0.1 for c in ("1", "2", "3")})
        sample.to_csv(cfg.parent / "data" / "probs.csv", index=False)
        extra = ["--set", "data.sample_submission=data/probs.csv"]
    before = snapshot(cfg.parent)
    code = submit.main(["--config", str(cfg), "--decide", *extra])
    assert_user_error(code, capsys, "--decide")
    assert snapshot(cfg.parent) == before


def test_scoring_by_another_metric_names_the_loss_auto_resolved_to(trained, capsys):
    code = submit.main(["--config", str(trained), "--set", "data.metric=accuracy"])
    assert_user_error(code, capsys, 'train.loss = "ce" here, "balanced_ce" there', "follows data.metric")
    assert submit.main(["--config", str(trained), "--quiet", "--set", "data.metric=accuracy",
                        "--set", "train.loss=balanced_ce"]) == 0
