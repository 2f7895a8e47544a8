"""train.teacher: a student learns from a finished run's outputs on the same folds, with an honest CV: fold k's
soft targets come from the teacher's fold k model only, which never saw fold k's validation rows."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from comp import config, folds, submit, train
from comp.nn.objective import Distilled
from comp.predict import FoldModel, fold_predictor
from comp.tables.read import load_competition
from comp.tables.splits import load_folds
from tests.conftest import assert_user_error, make_tables, snapshot, write_project

QUIET = ["--quiet"]
STUDENT = [*QUIET, "--set", "run.name=student", "--set", "train.teacher=lin"]


@pytest.fixture
def taught(tmp_path, tiny_model):
    """The tiny project with a finished linear teacher run 'lin' and an encoder student of it."""
    cfg = write_project(tmp_path, tiny_model, make_tables(n_train=60, n_test=12))
    assert folds.main(["--config", str(cfg), *QUIET]) == 0
    assert train.main(["--config", str(cfg), "--all", *QUIET, "--set", "model.kind=linear", "--set", "run.name=lin"]) == 0
    return cfg


def test_fold_ks_soft_targets_are_the_teachers_fold_k_model_on_its_training_rows(taught):
    cfg = config.load(taught, ["run.name=student", "train.teacher=lin"])
    comp = load_competition(cfg)
    split, fp = load_folds(cfg, comp)
    for fold in range(cfg.folds.n_splits):
        got = train.teacher_outputs(cfg, comp, split, fp, fold, train.cli.console(True))
        tr = np.flatnonzero(split != fold)
        teacher = cfg.replace("run", name="lin")
        own = config.load(teacher.fold_dir(fold) / "config.toml")
        expected = fold_predictor(FoldModel(own, teacher.fold_dir(fold), comp.classes), None)(
            comp.train.iloc[tr].reset_index(drop=True), [comp.train_text[i] for i in tr], train.cli.console(True))
        assert got.logits.shape == (len(tr), len(comp.classes)) and np.allclose(got.logits, expected)
        assert got.record["from"] == "lin" and got.record["teacher_sha256"]
    # the other folds' models are never asked: removing them leaves fold 0's targets as they were
    before = train.teacher_outputs(cfg, comp, split, fp, 0, train.cli.console(True)).logits
    for fold in (1, 2):
        shutil.rmtree(cfg.replace("run", name="lin").fold_dir(fold))
    assert np.array_equal(train.teacher_outputs(cfg, comp, split, fp, 0, train.cli.console(True)).logits, before)


def test_a_student_trains_records_its_teacher_and_is_refused_once_the_teacher_changes(taught, capsys):
    assert train.main(["--config", str(taught), "--all", *STUDENT]) == 0
    record = json.loads((taught.parent / "folds" / "student" / "fold_1" / "metrics.json").read_text())
    assert record["distill"]["from"] == "lin" and record["distill"]["weight"] == 0.5
    assert submit.main(["--config", str(taught), *STUDENT]) == 0
    plain = config.load(taught, ["run.name=student"])
    assert plain.hash() != config.load(taught, ["run.name=student", "train.teacher=lin"]).hash()
    assert plain.hash() == config.load(taught, ["run.name=student", "train.temperature=4"]).hash()  # no teacher
    assert train.main(["--config", str(taught), "--fold", "1", "--force", *QUIET, "--set", "model.kind=linear",
                       "--set", "run.name=lin", "--set", "model.tfidf.C=2"]) == 0
    assert_user_error(submit.main(["--config", str(taught), *STUDENT]), capsys, "distillation teacher")


def test_the_distilled_loss_mixes_labels_and_the_teachers_outputs():
    torch.manual_seed(0)
    student, teacher, y = torch.randn(6, 3, requires_grad=True), torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    ce = torch.nn.CrossEntropyLoss()
    assert torch.allclose(Distilled(ce, 0.5, 2.0, "single_label")(student, y), ce(student, y))  # no teacher
    only = Distilled(ce, 1.0, 2.0, "single_label")
    assert only(teacher, y, teacher).abs() < 1e-6  # the student agreeing with its teacher costs nothing
    only(student, y, teacher).backward()
    step = student - 0.5 * student.grad
    assert only(step, y, teacher) < only(student, y, teacher)
    labels = torch.randint(0, 2, (6, 3)).float()
    bce = torch.nn.BCEWithLogitsLoss()
    assert Distilled(bce, 0.3, 1.0, "multi_label")(student, labels, teacher) > 0
    mse = torch.nn.MSELoss()
    values = torch.randn(6, 1)
    assert torch.allclose(Distilled(mse, 1.0, 3.0, "regression")(values, values + 1, values), torch.tensor(0.0))


@pytest.mark.parametrize("sets, needle", [
    (["train.teacher=student"], "names this run"),
    (["train.teacher=lin", "train.pseudo_run=lin"], "use one of them"),
    (["train.teacher=lin", "model.kind=linear"], "distils into encoder runs"),
    (["train.teacher=nope"], "has no finished fold"),
])
def test_teacher_errors_are_one_line_and_write_nothing(taught, capsys, sets, needle):
    before = snapshot(taught.parent)
    args = [a for s in ["run.name=student", *sets] for a in ("--set", s)]
    assert_user_error(train.main(["--config", str(taught), "--fold", "0", *QUIET, *args]), capsys, needle)
    after = snapshot(taught.parent)
    assert {k: v for k, v in after.items() if not k.startswith("folds/cache/")} == before


def test_changing_fold_ks_validation_rows_leaves_fold_ks_soft_targets_where_they_were(taught):
    """The honesty test: fold k's targets come from a model that never saw fold k's validation rows, so editing
    those rows (their text and labels) moves nothing; editing one of fold k's training rows does."""
    cfg = config.load(taught, ["run.name=student", "train.teacher=lin"])
    comp = load_competition(cfg)
    split, fp = load_folds(cfg, comp)
    quiet = train.cli.console(True)
    before = train.teacher_outputs(cfg, comp, split, fp, 0, quiet).logits
    path = taught.parent / "data" / "train.csv"
    table = pd.read_csv(path)
    original = table.copy()
    val = np.flatnonzero(split == 0)
    table.loc[val, "body"] = "north south east " * 3  # fold 0's validation rows, rewritten
    table.loc[val, "label"] = table.loc[val, "label"].iloc[::-1].to_numpy()
    table.to_csv(path, index=False)
    edited = load_competition(cfg)
    assert np.array_equal(train.teacher_outputs(cfg, edited, split, fp, 0, quiet).logits, before)
    tr = np.flatnonzero(split != 0)
    original.loc[tr[:5], "body"] = "north south east " * 3  # now five of its training rows
    original.to_csv(path, index=False)
    assert not np.allclose(train.teacher_outputs(cfg, load_competition(cfg), split, fp, 0, quiet).logits, before)


def test_a_teacher_on_another_split_is_one_line(taught, capsys):
    other = ["--quiet", "--set", "folds.path=folds/b/folds.csv", "--set", "folds.seed=8"]
    assert folds.main(["--config", str(taught), *other]) == 0
    assert train.main(["--config", str(taught), "--all", *other, "--set", "model.kind=linear",
                       "--set", "run.name=lin2"]) == 0
    shutil.move(str(taught.parent / "folds" / "b" / "lin2"), str(taught.parent / "folds" / "lin2"))
    assert_user_error(train.main(["--config", str(taught), "--fold", "0", *QUIET, "--set", "run.name=student",
                                  "--set", "train.teacher=lin2"]), capsys, "another split")
