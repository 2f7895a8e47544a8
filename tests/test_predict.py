"""comp.predict: any table with a finished run's folds, the same logits as training wrote, one-line errors."""

import numpy as np
import pandas as pd
import pytest

from comp import folds, predict, submit, train
from tests.conftest import assert_user_error, snapshot, write_project


def cli(cfg, main, *args):
    return main(["--config", str(cfg), "--quiet", *args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """The tiny project with an encoder run and a linear run, both finished and submitted."""
    cfg = write_project(tmp_path_factory.mktemp("predict"), tiny_model)
    assert folds.main(["--config", str(cfg)]) == 0
    assert cli(cfg, train.main, "--all") == 0
    assert cli(cfg, train.main, "--all", "--set", "model.kind=linear", "--set", "run.name=lin") == 0
    assert cli(cfg, submit.main) == 0
    return cfg


@pytest.mark.parametrize("run", ["tiny", "lin"])
def test_predicting_the_test_table_reproduces_training_and_submit(trained, tmp_path, run):
    cfg, data = trained, trained.parent / "data"
    out = tmp_path / "sub.csv"
    code = cli(cfg, predict.main, "--run", run, "--test", str(data / "test.csv"), "--out", str(out),
               "--sample", str(data / "sample_submission.csv"), "--save-logits", str(tmp_path / "logits"))
    assert code == 0
    for k in range(3):
        written = np.load(cfg.parent / "folds" / run / f"fold_{k}" / "test_logits.npy")
        assert np.allclose(np.load(tmp_path / "logits" / f"fold_{k}.npy"), written, atol=1e-5)
    if run == "tiny":  # the same file as comp.submit's: the sample's id order and columns
        assert pd.read_csv(out).equals(pd.read_csv(cfg.parent / "submissions" / "tiny.csv"))


def test_predict_takes_any_table_in_its_own_order_and_ignores_extra_columns(trained, tmp_path):
    cfg, data = trained, trained.parent / "data"
    table = pd.read_csv(data / "test.csv").iloc[::-1].head(7).assign(extra="x")
    table.to_csv(tmp_path / "hidden.csv", index=False)
    assert cli(cfg, predict.main, "--test", str(tmp_path / "hidden.csv"), "--out", str(tmp_path / "s.csv")) == 0
    sub = pd.read_csv(tmp_path / "s.csv")
    assert list(sub["id"]) == list(table["id"]) and list(sub.columns) == ["id", "label"]


BAD = {
    "missing column": (lambda t: t.drop(columns=["shop"]), ["'shop'"]),
    "no rows": (lambda t: t.iloc[:0], ["no rows"]),
    "non-numeric": (lambda t: t.assign(count=["x"] + list(t["count"].iloc[1:])), ["'count'", "non-numbers"]),
    "duplicate ids": (lambda t: pd.concat([t, t.iloc[:1]]), ["duplicate id"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_tables_are_one_line_and_write_nothing(trained, tmp_path, capsys, case):
    edit, needles = BAD[case]
    edit(pd.read_csv(trained.parent / "data" / "test.csv")).to_csv(tmp_path / "t.csv", index=False)
    before = snapshot(tmp_path)
    code = cli(trained, predict.main, "--test", str(tmp_path / "t.csv"), "--out", str(tmp_path / "s.csv"))
    assert_user_error(code, capsys, *needles)
    assert snapshot(tmp_path) == before


def test_an_unfinished_run_is_refused(trained, tmp_path, capsys):
    code = cli(trained, predict.main, "--run", "nothing", "--test", str(trained.parent / "data" / "test.csv"),
               "--out", str(tmp_path / "s.csv"))
    assert_user_error(code, capsys, "run 'nothing'", "not finished")
    assert not (tmp_path / "s.csv").exists()
