"""Blends of runs and pseudo-label rounds: honest CV, weights on the simplex, pseudo rows in training parts only."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

from comp import blend, config, metrics, submit, train
from comp.outputs import collect as outputs
from comp.outputs import runs
from comp.tables import splits
from comp.tables.read import load_competition
from tests.conftest import assert_user_error, snapshot, trained_project


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model):
    """The tiny project with run 'tiny' and a second seed 'tiny-s5' trained on the same folds."""
    cfg = trained_project(tmp_path_factory.mktemp("ensemble"), tiny_model)
    assert train.main(["--config", str(cfg), "--all", "--quiet", "--set", "run.name=tiny-s5",
                       "--set", "train.seed=5"]) == 0
    return cfg


def test_fitted_weights_are_on_the_simplex_and_prefer_the_better_run():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    good = softmax(np.eye(3)[y] * 3 + rng.normal(size=(300, 3)), axis=1)
    noise = softmax(rng.normal(size=(300, 3)), axis=1)
    w = blend.fit_weights(y, [noise, good, noise[::-1]])
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
    assert w[1] > 0.9
    mixed = sum(wi * p for wi, p in zip(w, [noise, good, noise[::-1]], strict=True))
    assert metrics.score_predictions(y, mixed)["log_loss"] <= metrics.score_predictions(y, good)["log_loss"] + 1e-9


def test_honest_cv_never_fits_a_folds_weights_on_its_own_rows():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 400)
    fold = np.arange(400) % 4
    probs = [softmax(np.eye(3)[y] * s + rng.normal(size=(400, 3)), axis=1) for s in (1.0, 2.0, 0.5)]
    _, weights = blend.honest_oof(y, fold, probs)
    changed = [p.copy() for p in probs]
    changed[2][fold == 0] = softmax(np.eye(3)[y[fold == 0]] * 50, axis=1)  # fold 0's rows now favour run 2
    _, after = blend.honest_oof(y, fold, changed)
    assert np.allclose(weights[0], after[0])  # fold 0's weights come from folds 1-3 only
    assert not np.allclose(weights[1], after[1])  # the other folds' weights do see fold 0's rows


def test_hill_climbing_finds_the_known_optimum_and_is_honest():
    """Runs A and B are each right on their own half of the rows and less sure where wrong: an even mix of the
    two is right everywhere, more of either is not, and a noise run never helps."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    half = np.arange(300) < 150
    sure, wrong = np.eye(3)[y] * 0.9 + 0.05, np.eye(3)[(y + 1) % 3] * 0.6 + 0.2
    a, b = np.where(half[:, None], sure, wrong), np.where(half[:, None], wrong, sure)
    noise = softmax(rng.normal(size=(300, 3)), axis=1)
    w = blend.hill_weights(y, [noise, a, b], "accuracy")
    assert w.tolist() == [0.0, 0.5, 0.5]
    assert metrics.score_predictions(y, 0.5 * a + 0.5 * b)["accuracy"] == 1.0
    fold = np.arange(300) % 3

    def fitter(yy, pp):
        return blend.hill_weights(yy, pp, "accuracy")

    _, weights = blend.honest_oof(y, fold, [noise, a, b], fitter)
    changed = [noise.copy(), a, b]
    changed[0][fold == 0] = np.eye(3)[y[fold == 0]]  # on fold 0's rows the noise run is now perfect
    _, after = blend.honest_oof(y, fold, changed, fitter)
    assert np.allclose(weights[0], after[0]) and not np.allclose(weights[1], after[1])


def test_blend_cli_prints_and_writes_and_self_blend_equals_the_run(two_runs, capsys):
    cfg = two_runs
    assert submit.main(["--config", str(cfg), "--quiet"]) == 0
    assert blend.main(["--config", str(cfg), "--runs", "tiny,tiny-s5", "--weights", "fit", "--name", "mix"]) == 0
    out = capsys.readouterr().out
    assert "run tiny " in out and "run tiny-s5" in out and "fitted (weights from the other folds)" in out
    record = json.loads((cfg.parent / "folds" / "mix" / "blend.json").read_text())
    assert sum(record["weights"]) == pytest.approx(1.0) and min(record["weights"]) >= 0
    assert len(record["fold_weights"]) == 3
    assert (cfg.parent / "submissions" / "mix.csv").is_file()
    assert "mix" in pd.read_csv(cfg.parent / "submissions" / "runs.csv")["run"].tolist()
    # a run blended with itself is the run: same CV, same submission
    assert submit.main(["--config", str(cfg), "--runs", "tiny,tiny", "--name", "self", "--quiet"]) == 0
    own = json.loads((cfg.parent / "folds" / "self" / "blend.json").read_text())
    c = config.load(cfg)
    comp, _, _, _, oof = outputs.load_run(c)
    assert own["cv"]["log_loss"] == pytest.approx(metrics.score(comp.y, oof)["log_loss"], abs=1e-6)
    assert pd.read_csv(cfg.parent / "submissions" / "self.csv").equals(pd.read_csv(cfg.parent / "submissions" / "tiny.csv"))
    assert blend.main(["--config", str(cfg), "--runs", "tiny,tiny-s5", "--weights", "hill", "--name", "hill"]) == 0
    hill = json.loads((cfg.parent / "folds" / "hill" / "blend.json").read_text())
    assert hill["weights_method"] == "hill" and sum(hill["weights"]) == pytest.approx(1.0)
    assert len(hill["fold_weights"]) == 3 and (cfg.parent / "submissions" / "hill.csv").is_file()


def test_blend_refuses_a_run_on_other_folds(two_runs, tmp_path, capsys):
    root = tmp_path / "p"
    shutil.copytree(two_runs.parent, root)
    cfg = root / "comp.toml"
    path = root / "folds" / "tiny-s5" / "fold_1" / "metrics.json"
    record = json.loads(path.read_text())
    record["folds_fingerprint"] = "0" * 16
    path.write_text(json.dumps(record))
    before = snapshot(root)
    code = blend.main(["--config", str(cfg), "--runs", "tiny,tiny-s5"])
    assert_user_error(code, capsys, "another split")
    assert snapshot(root) == before


def test_pseudo_rows_come_from_the_folds_own_teacher_and_never_enter_validation(two_runs, capsys):
    cfg_path = two_runs
    cfg = config.load(cfg_path, ["run.name=student", "train.pseudo_run=tiny", "train.pseudo_threshold=0.34"])
    comp = load_competition(cfg)
    split, fp = splits.load_folds(cfg, comp)
    pseudo = runs.pseudo_labels(cfg, comp, fp, 1)
    teacher = softmax(np.load(cfg_path.parent / "folds" / "tiny" / "fold_1" / "test_logits.npy"), axis=1)
    expected = np.flatnonzero(teacher.max(1) >= 0.34)
    assert len(expected) > 0 and np.array_equal(pseudo.index, expected)  # fold 1's own teacher only
    assert np.array_equal(pseudo.labels, teacher[expected].argmax(1))
    tokens = [np.array([i], np.int32) for i in range(len(comp.train))]
    test_tokens = [np.array([10_000 + i], np.int32) for i in range(len(comp.test))]
    tr, va = runs.split(split, 1)
    _, tr_rows, va_rows, _ = runs.prepare_fold(cfg, comp, tr, va, runs.Tokens(tokens, test_tokens, 0), pseudo=pseudo)
    assert [int(t[0]) for t in va_rows.tokens] == va.tolist()  # validation: the fold's own train rows only
    assert len(tr_rows) == len(tr) + len(expected)
    assert sorted(int(t[0]) for t in tr_rows.tokens[len(tr):]) == (10_000 + expected).tolist()

    assert train.main(["--config", str(cfg_path), "--fold", "1", "--pseudo", "tiny", "--set", "run.name=student",
                       "--set", "train.pseudo_threshold=0.34"]) == 0
    out = capsys.readouterr().out
    assert f"+{len(expected)} pseudo-labelled test rows from run 'tiny'" in out
    record = json.loads((cfg_path.parent / "folds" / "student" / "fold_1" / "metrics.json").read_text())
    assert record["pseudo"]["rows"] == len(expected) and sum(record["pseudo"]["per_class"].values()) == len(expected)
    assert record["n_val"] == len(va)
    assert np.array_equal(np.load(cfg_path.parent / "folds" / "student" / "fold_1" / "oof_ids.npy"), comp.train_ids[va])


def test_pseudo_from_an_untrained_run_is_one_line(two_runs, capsys):
    before = snapshot(two_runs.parent)
    code = train.main(["--config", str(two_runs), "--fold", "0", "--pseudo", "nosuch", "--set", "run.name=x"])
    assert_user_error(code, capsys, "train.pseudo_run 'nosuch'", "train that run first")
    assert snapshot(two_runs.parent) == before


def noise(rng, n: int, k: int) -> np.ndarray:
    return softmax(rng.normal(size=(n, k)), axis=1)


def test_the_auto_ensembles_cv_counts_its_own_choice_on_shuffled_labels():
    """Members that know nothing: the nested choice (each fold's combiner chosen and fitted on the other folds)
    stays at the permutation null, where the same stack fitted and scored on all rows shows its optimism."""
    from comp.classical import stacking

    cfg = config.load(config_path(), ["data.metric=macro_f1"])
    f1, nested, in_sample = metrics.REGISTRY["macro_f1"].fn, [], []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        y, folds = rng.integers(0, 3, 600), rng.permutation(np.arange(600) % 5)
        oofs = [noise(rng, 600, 3) for _ in range(3)]
        out, _, record, _ = blend.auto_ensemble(cfg, y, folds, oofs, [noise(rng, 9, 3) for _ in range(3)])
        assert len(record["fold_choices"]) == 5 and record["chosen"] in record["candidates"]
        assert record["candidates"][record["chosen"]] == min(record["candidates"].values())  # the lowest log loss
        stacked = stacking.fit("logistic", y, oofs, 3, "balanced", 0).predict(oofs)
        for got, p in ((nested, out), (in_sample, stacked)):
            got.append(f1(y, p) - np.mean([f1(rng.permutation(y), p) for _ in range(50)]))
    assert np.mean(nested) < 0.02 < np.mean(in_sample)  # one seed's null spreads 0.02; ten seeds' mean 0.006


def test_the_auto_ensemble_drops_a_noise_member_and_never_trails_the_best_one():
    cfg = config.load(config_path(), ["data.metric=macro_f1"])
    rng = np.random.default_rng(0)
    y, folds = rng.integers(0, 4, 300), rng.permutation(np.arange(300) % 5)
    good = [softmax(np.eye(4)[y] * s + rng.normal(size=(300, 4)), axis=1) for s in (1.5, 1.0)]
    oofs = [good[0], noise(rng, 300, 4), good[1]]
    tests = [noise(rng, 7, 4) for _ in oofs]
    out, probs, record, fitted = blend.auto_ensemble(cfg, y, folds, oofs, tests)
    assert "stack" not in record["candidates"]  # 300 rows, 4 classes, 3 runs: too few rows per coefficient
    assert fitted[1] == 0 and probs.shape == (7, 4)
    f1 = metrics.REGISTRY["macro_f1"].fn
    assert f1(y, out) >= f1(y, good[0]) - 0.02


def test_blend_chooses_by_default_and_its_bundle_predicts_its_file(two_runs, tmp_path, capsys):
    from comp import export, predict

    cfg = two_runs
    capsys.readouterr()
    assert blend.main(["--config", str(cfg), "--runs", "tiny,tiny-s5", "--name", "auto"]) == 0
    out = capsys.readouterr().out
    record = json.loads((cfg.parent / "folds" / "auto" / "blend.json").read_text())
    assert record["weights_method"] == "auto" and record["auto"]["chosen"] in out and "cross-fitted" in out
    assert set(record["auto"]["candidates"]) >= {"best run", "mean", "fitted weights", "hill-climbing"}
    assert export.main(["--config", str(cfg), "--blend", "auto", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    data = cfg.parent / "data"
    assert predict.main(["--bundle", str(tmp_path / "b"), "--test", str(data / "test.csv"), "--quiet", "--sample",
                         str(data / "sample_submission.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    assert pd.read_csv(tmp_path / "p.csv").equals(pd.read_csv(cfg.parent / "submissions" / "auto.csv"))


def config_path():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "comp.toml"
