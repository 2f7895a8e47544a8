"""Paths where comp could print a plausible score or write a plausible file that is wrong: each is refused in one
line or gives the right answer."""

import json

import numpy as np
import pandas as pd
import pytest

from comp import blend, config, export, folds, predict, submit, train, tune
from comp.errors import CompError
from comp.outputs import runs
from comp.outputs.collect import split
from comp.tables.features import MetaEncoder
from comp.tables.read import load_competition
from comp.tables.splits import load_folds
from tests.conftest import assert_user_error, make_tables, snapshot, write_project

LINEAR = ["--set", "model.kind=linear"]


def linear_run(cfg, name: str, *extra: str) -> None:
    assert train.main(["--config", str(cfg), "--all", "--quiet", "--set", f"run.name={name}", *LINEAR, *extra]) == 0


@pytest.fixture
def split_project(tmp_path, tiny_model):
    """The tiny project with its folds made."""
    cfg = write_project(tmp_path, tiny_model)
    assert folds.main(["--config", str(cfg), "--quiet"]) == 0
    return cfg


# 1 ----------------------------------------------------------------------------------------------------------

def coded_tables(test_codes) -> dict[str, pd.DataFrame]:
    """The fixture tables with an integer-coded category "code" (the label's number) in train, `test_codes` in test."""
    t = make_tables()
    t["train.csv"]["code"] = t["train.csv"]["label"]
    t["test.csv"]["code"] = test_codes(t["solution.csv"]["label"].to_numpy())
    return t


def coded_project(tmp_path, tiny_model, test_codes):
    cfg = write_project(tmp_path, tiny_model, coded_tables(test_codes))
    cfg.write_text(cfg.read_text().replace('categorical = ["shop"]', 'categorical = ["shop", "code"]'))
    return cfg


def test_an_int_category_read_as_float_in_the_test_table_encodes_as_in_training(tmp_path, tiny_model):
    def with_one_missing(labels):
        codes = labels.astype(float)
        codes[0] = np.nan  # test.csv now spells the codes 1.0, 2.0, 3.0
        return codes

    cfg = config.load(coded_project(tmp_path, tiny_model, with_one_missing))
    comp = load_competition(cfg)
    assert comp.test["code"].dtype == float
    encoder = MetaEncoder.from_config(cfg).fit(comp.train)
    assert encoder.unseen(comp.test)["code"] == 1  # the missing value only
    names = encoder.feature_names()
    x = encoder.transform(comp.test)
    for row, code in zip(x[1:], comp.test["code"].iloc[1:], strict=True):
        assert row[names.index(f"code={int(code)}")] == 1.0


def test_a_category_mostly_unseen_in_the_test_table_is_one_line(tmp_path, tiny_model, capsys):
    cfg = coded_project(tmp_path, tiny_model, lambda labels: [f"c{v}" for v in labels])
    before = snapshot(tmp_path)
    code = folds.main(["--config", str(cfg)])
    assert_user_error(code, capsys, "categorical column 'code'", "never seen in training", "c1", "data.categorical")
    assert snapshot(tmp_path) == before


# 2 ----------------------------------------------------------------------------------------------------------

def test_a_regressions_decision_levels_travel_in_the_bundle(tmp_path, tiny_model):
    t = make_tables()
    t["sample_submission.csv"]["label"] = 0.0
    cfg = write_project(tmp_path, tiny_model, t)
    cfg.write_text(cfg.read_text().replace('label = "label"\n', 'label = "label"\ntask = "regression"\n'
                                           'metric = "qwk"\n'))
    assert folds.main(["--config", str(cfg), "--quiet"]) == 0
    linear_run(cfg, "tiny")
    assert submit.main(["--config", str(cfg), "--quiet", "--decide", *LINEAR]) == 0
    written = pd.read_csv(tmp_path / "submissions" / "tiny.csv")
    assert written["label"].nunique() > 1 and set(written["label"]) <= {1.0, 2.0, 3.0}
    assert export.main(["--config", str(cfg), "--quiet", *LINEAR, "--out", str(tmp_path / "b")]) == 0
    args = ["--test", str(tmp_path / "data" / "test.csv"), "--sample", str(tmp_path / "data" / "sample_submission.csv")]
    assert predict.main(["--quiet", "--bundle", str(tmp_path / "b"), "--out", str(tmp_path / "q.csv"), *args]) == 0
    assert pd.read_csv(tmp_path / "q.csv").equals(written)


# 3 ----------------------------------------------------------------------------------------------------------

def test_tuning_never_trains_or_validates_on_the_tuned_folds_validation_rows(split_project, monkeypatch):
    seen = []
    real = tune.fit_split

    def spy(cfg, comp, part, index, *args, **kwargs):
        seen.append((index, part))
        return real(cfg, comp, part, index, *args, **kwargs)

    monkeypatch.setattr(tune, "fit_split", spy)
    assert tune.main(["--config", str(split_project), "--quiet", "--n-trials", "1", "--set", "train.epochs=1",
                      "--set", "tune.folds=[0, 2]"]) == 0
    cfg = config.load(split_project)
    fold, _ = load_folds(cfg, load_competition(cfg))
    assert sorted(k for k, _ in seen) == [0, 2]
    for k, (tr, va) in seen:
        own_train, own_val = split(fold, k)
        assert len(va) > 0 and not set(tr) & set(va)
        assert set(tr) | set(va) <= set(own_train) and not (set(tr) | set(va)) & set(own_val)


# 4 ----------------------------------------------------------------------------------------------------------

def test_a_retrained_teacher_invalidates_its_pseudo_label_student(split_project, capsys):
    cfg = split_project
    linear_run(cfg, "teacher")
    student = ["--set", "run.name=student", "--set", "train.pseudo_run=teacher", "--set", "train.pseudo_threshold=0.34"]
    assert train.main(["--config", str(cfg), "--all", "--quiet", *student]) == 0
    assert submit.main(["--config", str(cfg), "--quiet", *student]) == 0
    linear_run(cfg, "teacher", "--force", "--set", "model.numeric_transform=standard")
    capsys.readouterr()
    before = snapshot(cfg.parent / "folds")
    assert_user_error(train.main(["--config", str(cfg), "--all", *student]), capsys, "teacher run 'teacher' was "
                      "retrained", "--force")
    assert_user_error(submit.main(["--config", str(cfg), *student]), capsys, "teacher run 'teacher' was retrained")
    assert snapshot(cfg.parent / "folds") == before


# 5 ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "gbm"])
def test_pseudo_labels_for_a_classical_run_are_refused(split_project, capsys, kind):
    with pytest.raises(CompError, match="encoder runs only"):
        config.load(split_project, [f"model.kind={kind}", "train.pseudo_run=tiny"])
    before = snapshot(split_project.parent)
    code = train.main(["--config", str(split_project), "--all", "--pseudo", "tiny", "--set", f"model.kind={kind}",
                       "--set", "run.name=x"])
    assert_user_error(code, capsys, "train.pseudo_run", "encoder runs only")
    assert snapshot(split_project.parent) == before


# 6 ----------------------------------------------------------------------------------------------------------

def test_a_blend_whose_member_was_retrained_is_not_exported(split_project, tmp_path, capsys):
    cfg = split_project
    linear_run(cfg, "a")
    linear_run(cfg, "b", "--set", "model.numeric_transform=standard")
    assert blend.main(["--config", str(cfg), "--quiet", "--runs", "a,b", "--name", "ab"]) == 0
    assert export.main(["--config", str(cfg), "--quiet", "--blend", "ab", "--out", str(tmp_path / "ok")]) == 0
    linear_run(cfg, "b", "--force")  # b retrained (quantile numerics, the default): ab's weights were fitted on the old b
    capsys.readouterr()
    code = export.main(["--config", str(cfg), "--blend", "ab", "--out", str(tmp_path / "stale")])
    assert_user_error(code, capsys, "run 'b' was retrained", "make the blend again")
    assert not (tmp_path / "stale").exists()


def test_a_decision_rule_of_retrained_folds_is_not_applied(split_project, tmp_path, capsys):
    cfg = split_project
    linear_run(cfg, "tiny")
    assert submit.main(["--config", str(cfg), "--quiet", "--decide", *LINEAR]) == 0
    linear_run(cfg, "tiny", "--force", "--set", "model.numeric_transform=standard")
    capsys.readouterr()
    code = predict.main(["--config", str(cfg), *LINEAR, "--set", "model.numeric_transform=standard",
                         "--test", str(cfg.parent / "data" / "test.csv"), "--out", str(tmp_path / "p.csv")])
    assert_user_error(code, capsys, "decision.json", "retrained", "comp.submit --decide")
    assert not (tmp_path / "p.csv").exists()


# 7 ----------------------------------------------------------------------------------------------------------

def test_a_study_is_not_continued_on_another_base_config(split_project, capsys):
    cfg = split_project
    args = ["--config", str(cfg), "--quiet", "--n-trials", "1", "--set", "train.epochs=1"]
    assert tune.main(args) == 0
    best = cfg.parent / "folds" / "best_params.toml"
    written = best.read_text()
    assert tune.main(args) == 0  # the same base: the study is continued (it already holds its trial)
    capsys.readouterr()
    assert_user_error(tune.main([*args, "--set", "model.max_length=32"]), capsys, "another base config", "--study")
    assert best.read_text() == written
    assert tune.main([*args, "--set", "model.max_length=32", "--study", "short"]) == 0


# 8 ----------------------------------------------------------------------------------------------------------

def test_runs_trained_on_different_columns_blend(split_project, capsys):
    cfg = split_project
    linear_run(cfg, "text", "--set", "data.categorical=[]", "--set", "data.numeric=[]")
    linear_run(cfg, "all")
    assert blend.main(["--config", str(cfg), "--quiet", "--runs", "text,all", "--name", "both"]) == 0
    record = json.loads((cfg.parent / "folds" / "both" / "blend.json").read_text())
    assert record["runs"] == ["text", "all"]
    table = cfg.parent / "data" / "train.csv"  # a changed table is still refused, whichever columns it changes
    df = pd.read_csv(table)
    df.loc[0, "body"] = "changed"
    df.to_csv(table, index=False)
    capsys.readouterr()
    assert_user_error(blend.main(["--config", str(cfg), "--runs", "text,all", "--name", "both"]), capsys,
                      "training table's content changed")


# 9 ----------------------------------------------------------------------------------------------------------

def test_padding_device_and_the_resolved_precision_are_part_of_a_folds_identity(split_project, monkeypatch):
    base = config.load(split_project)
    assert config.load(split_project, ["train.pad_to_multiple_of=1"]).hash() != base.hash()
    assert config.load(split_project, ["train.device=auto"]).hash() != base.hash()
    assert config.load(split_project, ["train.eval_batch_size=3"]).hash() == base.hash()  # changes no output
    auto = config.load(split_project, ["train.precision=auto"])
    comp = load_competition(auto)
    _, fp = load_folds(auto, comp)
    identities = []
    for dtype in (None, __import__("torch").bfloat16):
        monkeypatch.setattr(runs, "resolve_precision", lambda tcfg, device, dtype=dtype: dtype)
        identities.append(runs.checkpoint_identity(auto, comp, 0, fp))
    assert identities[0]["precision"] == "fp32" and identities[1]["precision"] == "bfloat16"
    assert identities[0] != identities[1]


def test_predict_refuses_a_table_whose_categories_are_mostly_unseen(split_project, tmp_path, capsys):
    cfg = split_project
    linear_run(cfg, "tiny")
    table = pd.read_csv(cfg.parent / "data" / "test.csv")
    table["shop"] = [f"elsewhere{i}" for i in range(len(table))]
    table.to_csv(tmp_path / "other.csv", index=False)
    code = predict.main(["--config", str(cfg), *LINEAR, "--test", str(tmp_path / "other.csv"),
                         "--out", str(tmp_path / "p.csv")])
    assert_user_error(code, capsys, "categorical column 'shop'", "the table to predict")
    assert not (tmp_path / "p.csv").exists()


# Round three: refits and seed bags are checked as folds are ----------------------------------------------------

C100 = ("--set", "model.tfidf.C=100")


def test_a_refit_of_another_config_does_not_join_the_folds(split_project, tmp_path, capsys):
    cfg = split_project
    linear_run(cfg, "tiny")
    assert train.main(["--config", str(cfg), "--full", "--quiet", *LINEAR]) == 0  # C = 1
    linear_run(cfg, "tiny", "--force", *C100)  # the folds now C = 100, the refit still C = 1
    capsys.readouterr()
    before = snapshot(cfg.parent)
    assert_user_error(submit.main(["--config", str(cfg), *LINEAR, *C100, "--with-full"]), capsys,
                      "the refit of run 'tiny'", "another config", "model.tfidf.C", "--full --force")
    assert_user_error(predict.main(["--config", str(cfg), *LINEAR, *C100, "--with-full", "--test",
                                    str(cfg.parent / "data" / "test.csv"), "--out", str(tmp_path / "p.csv")]),
                      capsys, "the refit of run 'tiny'", "another config")
    assert_user_error(export.main(["--config", str(cfg), *LINEAR, *C100, "--with-full", "--out", str(tmp_path / "b")]),
                      capsys, "the refit of run 'tiny'", "another config")
    assert snapshot(cfg.parent) == before and not (tmp_path / "p.csv").exists() and not (tmp_path / "b").exists()
    assert train.main(["--config", str(cfg), "--full", "--quiet", *LINEAR, *C100]) == 0  # refitted: it joins again
    assert submit.main(["--config", str(cfg), "--quiet", *LINEAR, *C100, "--with-full"]) == 0


def test_a_seed_bag_refuses_a_seed_trained_with_another_config(split_project, capsys):
    cfg = split_project
    linear_run(cfg, "bag", "--seeds", "2")
    linear_run(cfg, "bag", "--force", *C100)  # seed 0 alone retrained with C = 100; bag-s1 keeps C = 1
    capsys.readouterr()
    code = submit.main(["--config", str(cfg), "--seeds", "2", "--set", "run.name=bag", *LINEAR, *C100])
    assert_user_error(code, capsys, "run 'bag-s1'", "another config", "model.tfidf.C")
    assert not (cfg.parent / "folds" / "bag-bag2").exists()
    linear_run(cfg, "bag", "--seeds", "2", "--force", *C100)
    assert submit.main(["--config", str(cfg), "--quiet", "--seeds", "2", "--set", "run.name=bag", *LINEAR, *C100]) == 0


def test_the_refit_of_a_student_or_a_pseudo_label_run_is_refused(split_project, capsys):
    cfg = split_project
    linear_run(cfg, "teacher")
    for sets in (["--set", "train.teacher=teacher"], ["--pseudo", "teacher"]):
        before = snapshot(cfg.parent)
        code = train.main(["--config", str(cfg), "--full", "--set", "train.epochs=1", *sets])
        assert_user_error(code, capsys, "a refit on every row cannot reproduce", "drop --full")
        assert snapshot(cfg.parent) == before


def test_a_refit_with_epochs_needs_no_folds_and_a_linear_refit_takes_no_epochs(split_project, capsys):
    cfg = split_project
    assert train.main(["--config", str(cfg), "--full", "--epochs", "1", "--quiet"]) == 0
    assert json.loads((cfg.parent / "folds" / "tiny" / "full" / "metrics.json").read_text())["epochs"] == 1
    before = snapshot(cfg.parent)
    assert_user_error(train.main(["--config", str(cfg), "--full", "--epochs", "7", *LINEAR]), capsys,
                      "--epochs 7", "a linear run has no epochs", "drop --epochs")
    assert snapshot(cfg.parent) == before
