"""End to end through the CLIs on the tiny model: folds → train → submit, and the user errors between them."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

from comp import config, folds, submit, train
from comp.outputs import collect as outputs
from comp.outputs import runs
from comp.tables import read as tables
from comp.tables import splits
from comp.tables.features import MetaEncoder
from tests.conftest import assert_user_error, snapshot, trained_project


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """A project with folds made and every fold trained once, shared by the read-only tests below."""
    return trained_project(tmp_path_factory.mktemp("trained"), tiny_model)


def fold_files(cfg_path, k):
    return cfg_path.parent / "folds" / "tiny" / f"fold_{k}"


def test_every_fold_writes_its_artifacts(trained):
    for k in range(3):
        out = fold_files(trained, k)
        assert sorted(p.name for p in out.iterdir()) == sorted(outputs.FILES)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["status"] == "complete" and 1 <= metrics["best_epoch"] <= len(metrics["history"])
        assert not list(out.glob(".*tmp"))  # no temp files left behind


def test_no_row_in_both_parts_and_oof_covers_its_fold(trained):
    cfg = config.load(trained)
    comp = tables.load_competition(cfg)
    f, _ = splits.load_folds(cfg, comp)
    seen = []
    for k in range(3):
        tr, va = runs.split(f, k)
        assert not set(tr) & set(va) and len(tr) + len(va) == len(comp.train)
        oof_ids = np.load(fold_files(trained, k) / "oof_ids.npy")
        assert np.array_equal(oof_ids, comp.train_ids[f == k])
        meta = json.loads((fold_files(trained, k) / "metrics.json").read_text())
        assert meta["n_train"] == len(tr) and meta["n_val"] == len(va)
        seen += oof_ids.tolist()
    assert sorted(seen) == sorted(comp.train_ids.tolist())  # every training row predicted out of fold exactly once


def test_encoders_fitted_on_training_rows_only(trained):
    cfg = config.load(trained)
    comp = tables.load_competition(cfg)
    f, _ = splits.load_folds(cfg, comp)
    for k in range(3):
        enc = MetaEncoder.load(fold_files(trained, k) / "encoders.json")
        train_part = comp.train["count"][f != k]
        assert enc.state["numeric"]["medians"][0] == pytest.approx(train_part.median())
        assert enc.state["numeric"]["medians"][0] != pytest.approx(comp.train["count"].median())


def test_submission_follows_sample_and_averages_fold_probabilities(trained, capsys):
    capsys.readouterr()
    assert submit.main(["--config", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "CV macro_f1" in out and "leaderboard macro_f1" in out and "mean±std" in out
    root = trained.parent
    sample = pd.read_csv(root / "data" / "sample_submission.csv")
    sub = pd.read_csv(root / "submissions" / "tiny.csv")
    assert list(sub.columns) == list(sample.columns)
    assert list(sub["id"]) == list(sample["id"])  # the sample's order, not the test table's
    assert set(sub["label"]) <= {1, 2, 3}

    test_ids = np.load(fold_files(trained, 0) / "test_ids.npy")
    probs = np.mean([softmax(np.load(fold_files(trained, k) / "test_logits.npy").astype(float), axis=1)
                     for k in range(3)], axis=0)
    expected = dict(zip(test_ids, np.array([1, 2, 3])[probs.argmax(1)], strict=True))
    assert [expected[str(i)] for i in sub["id"]] == sub["label"].tolist()


def test_probability_format_submission(trained, tmp_path):
    cfg = config.load(trained)
    comp = tables.load_competition(cfg)
    sample = pd.DataFrame({"id": comp.sample["id"], "1": 0.0, "3": 0.0, "2": 0.0})
    path = tmp_path / "probs_sample.csv"
    sample.to_csv(path, index=False)
    cfg = config.load(trained, [f"data.sample_submission='{path.as_posix()}'", f"run.submissions_dir='{tmp_path.as_posix()}'"])
    submit.submit(cfg)
    sub = pd.read_csv(tmp_path / "tiny.csv", dtype={"id": str})
    assert list(sub.columns) == ["id", "1", "3", "2"]
    logits = [np.load(fold_files(trained, k) / "test_logits.npy") for k in range(3)]
    probs = pd.DataFrame(outputs.average_probabilities(logits), index=comp.test_ids, columns=comp.classes)
    assert np.allclose(sub[["1", "3", "2"]].to_numpy(), probs.loc[sub["id"], ["1", "3", "2"]].to_numpy())
    assert np.allclose(sub[["1", "2", "3"]].sum(axis=1), 1.0)


def test_average_is_mean_of_softmax_not_softmax_of_mean():
    a = np.array([[10.0, 0.0, 0.0]])
    b = np.array([[0.0, 1.0, 0.0]])
    probs = outputs.average_probabilities([a, b])
    assert np.allclose(probs, (softmax(a, axis=1) + softmax(b, axis=1)) / 2)
    assert not np.allclose(probs, softmax((a + b) / 2, axis=1))


def test_finished_fold_is_skipped_unless_forced(trained, capsys):
    before = (fold_files(trained, 1) / "metrics.json").stat().st_mtime_ns
    assert train.main(["--config", str(trained), "--fold", "1"]) == 0
    assert "already trained" in capsys.readouterr().out
    assert (fold_files(trained, 1) / "metrics.json").stat().st_mtime_ns == before


def test_train_refuses_to_skip_a_fold_of_another_config(trained, capsys):
    before = snapshot(trained.parent)
    code = train.main(["--config", str(trained), "--fold", "0", "--set", "train.head_lr=0.5"])
    assert_user_error(code, capsys, "fold 0", "another config", "--force", "run.name")
    assert snapshot(trained.parent) == before


def test_submit_refuses_folds_of_another_config(trained, capsys):
    sub_dir = trained.parent / "submissions"
    before = snapshot(sub_dir) if sub_dir.exists() else {}
    code = submit.main(["--config", str(trained), "--set", "train.encoder_lr=0.5"])
    assert_user_error(code, capsys, "fold 0", "another config")
    assert (snapshot(sub_dir) if sub_dir.exists() else {}) == before


def test_same_seed_same_oof_logits(project):
    args = ["--config", str(project), "--fold", "0", "--set", "train.epochs=1"]
    assert folds.main(["--config", str(project)]) == 0
    assert train.main(args) == 0
    first = np.load(fold_files(project, 0) / "oof_logits.npy")
    assert train.main([*args, "--force"]) == 0
    assert np.array_equal(first, np.load(fold_files(project, 0) / "oof_logits.npy"))


def test_works_without_metadata_and_with_one_text_column(project):
    over = ["--set", "data.categorical=[]", "--set", "data.numeric=[]", "--set", "data.text=body",
            "--set", "train.epochs=1", "--set", "folds.n_splits=2"]
    assert folds.main(["--config", str(project), *over]) == 0
    assert train.main(["--config", str(project), "--all", *over]) == 0
    assert submit.main(["--config", str(project), *over]) == 0
    assert MetaEncoder.load(fold_files(project, 0) / "encoders.json").width == 0


def test_submit_before_every_fold_is_trained(project, capsys):
    assert folds.main(["--config", str(project)]) == 0
    assert train.main(["--config", str(project), "--fold", "0", "--set", "train.epochs=1"]) == 0
    capsys.readouterr()
    before = snapshot(project.parent)
    code = submit.main(["--config", str(project), "--set", "train.epochs=1"])
    assert_user_error(code, capsys, "fold 1", "not trained", "comp.train --fold 1")
    assert snapshot(project.parent) == before


def test_precisions_reach_similar_losses_and_second_run_uses_token_cache(project, capsys):
    assert folds.main(["--config", str(project)]) == 0
    losses = {}
    for precision in ("fp32", "bf16", "fp16"):
        capsys.readouterr()
        assert train.main(["--config", str(project), "--fold", "0", "--set", f"train.precision={precision}",
                           "--set", f"run.name={precision}"]) == 0
        out = capsys.readouterr().out
        assert ("from the cache" in out) == (precision != "fp32")  # tokenized once, then read back
        record = json.loads((project.parent / "folds" / precision / "fold_0" / "metrics.json").read_text())
        losses[precision] = [h["train_loss"] for h in record["history"]]
        assert np.isfinite(np.load(project.parent / "folds" / precision / "fold_0" / "oof_logits.npy")).all()
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.05)
    assert losses["fp16"] == pytest.approx(losses["fp32"], abs=0.05)
