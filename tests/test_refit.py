"""comp.train --full: one model on every training row for the folds' median best epoch (gbm: rounds), its test
predictions added to the folds' as one more fold by submit --with-full, predict and export, outside the CV."""

import json

import numpy as np
import pandas as pd
import pytest

from comp import config, export, folds, metrics, predict, submit, train
from tests.conftest import assert_user_error, make_tables, snapshot, write_project


@pytest.mark.parametrize("kind", ["encoder", "gbm", "linear"])
def test_a_refit_trains_on_every_row_and_joins_the_test_predictions_as_one_more_fold(tmp_path, tiny_model, kind):
    cfg = write_project(tmp_path, tiny_model, make_tables(n_train=48, n_test=10))
    sets = ["--quiet", "--set", f"model.kind={kind}"]
    assert folds.main(["--config", str(cfg), *sets]) == 0
    assert train.main(["--config", str(cfg), "--all", *sets]) == 0
    assert submit.main(["--config", str(cfg), *sets]) == 0
    cv = json.loads((tmp_path / "folds" / "tiny" / "fold_0" / "metrics.json").read_text())["oof"]
    assert train.main(["--config", str(cfg), "--full", *sets]) == 0
    full = tmp_path / "folds" / "tiny" / "full"
    record = json.loads((full / "metrics.json").read_text())
    assert record["n_train"] == 48 and record["oof"] is None and not (full / "oof_logits.npy").exists()
    key = {"encoder": "best_epoch", "gbm": "rounds"}.get(kind)
    if key:  # the folds' median
        expected = int(np.median([json.loads((tmp_path / "folds" / "tiny" / f"fold_{k}" / "metrics.json").read_text())[key]
                                  for k in range(3)]))
        assert record["epochs"] == expected
    assert submit.main(["--config", str(cfg), *sets, "--with-full"]) == 0
    both = pd.read_csv(tmp_path / "submissions" / "tiny.csv")
    runs = pd.read_csv(tmp_path / "submissions" / "runs.csv")
    cvs = [json.loads(row)["cv"] for row in runs["scores"]]
    assert len(cvs) == 2 and cvs[0] == cvs[1]  # the CV as it was: --with-full moves the test side alone
    loaded = config.load(cfg, [f"model.kind={kind}"])
    logits = [np.load(tmp_path / "folds" / "tiny" / f"fold_{k}" / "test_logits.npy") for k in range(3)]
    logits.append(np.load(full / "test_logits.npy"))
    average = np.mean([metrics.activate(loaded.data.task, lg) for lg in logits], axis=0)  # one fold's share
    classes = record["classes"]
    expected = dict(zip(np.load(full / "test_ids.npy").astype(str), np.asarray(classes)[average.argmax(1)], strict=True))
    assert [str(v) for v in both["label"]] == [expected[str(i)] for i in both["id"]]
    assert json.loads((tmp_path / "folds" / "tiny" / "fold_0" / "metrics.json").read_text())["oof"] == cv
    data, out = tmp_path / "data", tmp_path / "p.csv"
    assert predict.main(["--config", str(cfg), *sets, "--with-full", "--test", str(data / "test.csv"), "--out", str(out),
                         "--sample", str(data / "sample_submission.csv")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out), both)
    assert export.main(["--config", str(cfg), *sets, "--with-full", "--out", str(tmp_path / "b")]) == 0
    assert predict.main(["--bundle", str(tmp_path / "b"), "--quiet", "--test", str(data / "test.csv"),
                         "--out", str(tmp_path / "q.csv"), "--sample", str(data / "sample_submission.csv")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "q.csv"), both)


def test_a_refit_before_the_folds_or_submit_without_it_is_one_line(project, capsys):
    assert folds.main(["--config", str(project), "--quiet"]) == 0
    before = snapshot(project.parent)
    assert_user_error(train.main(["--config", str(project), "--full", "--quiet"]), capsys, "train the folds first")
    assert snapshot(project.parent) == before
    assert train.main(["--config", str(project), "--all", "--quiet", "--set", "train.epochs=1"]) == 0
    assert_user_error(submit.main(["--config", str(project), "--quiet", "--set", "train.epochs=1", "--with-full"]),
                      capsys, "no finished refit")


def test_a_blend_with_refits_keeps_its_weights_and_cv_and_exports_them(tmp_path, tiny_model):
    from comp import blend

    cfg = write_project(tmp_path, tiny_model, make_tables(n_train=48, n_test=10))
    q = ["--quiet"]
    assert folds.main(["--config", str(cfg), *q]) == 0
    for kind in ("linear", "gbm"):
        sets = [*q, "--set", f"model.kind={kind}", "--set", f"run.name={kind}"]
        assert train.main(["--config", str(cfg), "--all", *sets]) == 0
    assert train.main(["--config", str(cfg), "--full", *q, "--set", "model.kind=linear", "--set", "run.name=linear"]) == 0
    fit = ["--weights", "fit"]
    assert blend.main(["--config", str(cfg), *q, *fit, "--runs", "linear,gbm", "--name", "plain"]) == 0
    assert blend.main(["--config", str(cfg), *q, *fit, "--runs", "linear,gbm", "--name", "full", "--with-full"]) == 0
    plain, full = (json.loads((tmp_path / "folds" / n / "blend.json").read_text()) for n in ("plain", "full"))
    assert plain["cv"] == full["cv"] and plain["weights"] == full["weights"]  # fitted on the OOF rows alone
    assert list(full["with_full"]) == ["linear"] and not plain["with_full"]
    both = ["--weights", "equal", "--runs", "linear,gbm", "--with-full"]  # both runs keep a weight
    assert blend.main(["--config", str(cfg), *q, *both, "--name", "even"]) == 0
    assert export.main(["--config", str(cfg), *q, "--blend", "even", "--out", str(tmp_path / "b")]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [m["folds"] for m in manifest["members"]] == [4, 3]  # the refit travels as the linear run's 4th fold
    data = tmp_path / "data"
    assert predict.main(["--bundle", str(tmp_path / "b"), *q, "--test", str(data / "test.csv"),
                         "--out", str(tmp_path / "p.csv"), "--sample", str(data / "sample_submission.csv")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "submissions" / "even.csv"))
