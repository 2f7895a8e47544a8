"""Every user mistake ends in one line naming what is wrong, exit status 2, and nothing written."""

import numpy as np
import pandas as pd
import pytest

from comp import folds, submit, train
from tests.conftest import assert_user_error, snapshot

MAINS = {"folds": folds.main, "train": train.main, "submit": submit.main}


def edit(root, name, fn):
    path = root / "data" / name
    fn(pd.read_csv(path)).to_csv(path, index=False)


def at(df, row, **values):
    df = df.copy()
    for col, v in values.items():
        df[col] = df[col].astype(object)
        df.loc[df.index[row], col] = v
    return df


def make_folds(root):
    assert folds.main(["--config", str(root / "comp.toml")]) == 0


# each case: (prepare the project, command, words the one-line message must hold)
CASES = {
    "missing file": (lambda r: (r / "data" / "test.csv").unlink(), ["folds"], ["test file", "not found"]),
    "empty file": (lambda r: (r / "data" / "train.csv").write_bytes(b""), ["folds"], ["train file", "empty"]),
    "not utf-8": (lambda r: (r / "data" / "test.csv").write_bytes("id,title,body,shop,count\n1,a,caf\xe9,x,1\n"
                                                                   .encode("latin-1")), ["folds"], ["test file", "UTF-8"]),
    "missing column": (lambda r: edit(r, "test.csv", lambda d: d.drop(columns=["shop"])), ["folds"],
                       ["test.csv", "'shop'"]),
    "duplicate train ids": (lambda r: edit(r, "train.csv", lambda d: pd.concat([d, d.iloc[:2]])), ["folds"],
                            ["train.csv", "duplicate id", "1000"]),
    "duplicate test ids": (lambda r: edit(r, "test.csv", lambda d: pd.concat([d, d.iloc[:1]])), ["folds"],
                           ["test.csv", "duplicate id"]),
    "ids in train and test": (lambda r: edit(r, "test.csv", lambda d: at(d, 0, id=1000)), ["folds"],
                              ["both train and test", "1000"]),
    "empty text": (lambda r: edit(r, "train.csv", lambda d: at(d, 1, title=None, body=None)), ["folds"],
                   ["train.csv", "no text", "1001", "allow_empty_text"]),
    "missing label": (lambda r: edit(r, "train.csv", lambda d: at(d, 2, label=None)), ["folds"],
                      ["train.csv", "missing label", "1002"]),
    "label in test": (lambda r: edit(r, "test.csv", lambda d: d.assign(label=1)), ["folds"],
                      ["test.csv", "label column"]),
    "text in numeric": (lambda r: edit(r, "train.csv", lambda d: at(d, 3, count="many")), ["folds"],
                        ["train.csv", "'count'", "many"]),
    "infinite numeric": (lambda r: edit(r, "test.csv", lambda d: at(d, 0, count=np.inf)), ["folds"],
                         ["test.csv", "'count'", "infinite"]),
    "class too small": (lambda r: None, ["folds", "--set", "folds.n_splits=31"], ["fewer than folds.n_splits = 31"]),
    "sample ids differ": (lambda r: edit(r, "sample_submission.csv", lambda d: at(d, 0, id=5)), ["folds"],
                          ["sample_submission", "test ids"]),
    "unknown config key": (lambda r: None, ["folds", "--set", "folds.n_split=3"], ["folds.n_split"]),
    "set of wrong type": (lambda r: None, ["folds", "--set", "folds.n_splits=three"], ["folds.n_splits", "int"]),
    "train before folds": (lambda r: None, ["train", "--fold", "0"], ["folds.csv", "make folds"]),
    "fold out of range": (make_folds, ["train", "--fold", "3"], ["--fold 3", "0..2"]),
    "rows added": (lambda r: (make_folds(r), edit(r, "train.csv", lambda d: pd.concat(
        [d, d.iloc[:1].assign(id=5000)]))), ["train", "--fold", "0"], ["folds.csv", "1 added"]),
    "rows removed": (lambda r: (make_folds(r), edit(r, "train.csv", lambda d: d.iloc[1:])), ["train", "--fold", "0"],
                     ["folds.csv", "1 removed"]),
    "rows relabelled": (lambda r: (make_folds(r), edit(r, "train.csv", lambda d: d.assign(
        label=np.roll(d["label"], 1)))), ["train", "--fold", "0"], ["folds.csv", "labels changed"]),
    "folds edited": (lambda r: (make_folds(r), (r / "folds" / "folds.csv").write_text("id,fold\n1,0\n")),
                     ["train", "--fold", "0"], ["folds.csv", "changed after it was written"]),
    "model path not a model": (make_folds, ["train", "--fold", "0", "--set", "model.name_or_path='data'"],
                               ["model.name_or_path", "'data'"]),
    "submit before folds": (lambda r: None, ["submit"], ["folds.csv", "make folds"]),
    "submit before training": (make_folds, ["submit"], ["fold 0", "not trained"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(project, capsys, case):
    prepare, argv, needles = CASES[case]
    root = project.parent
    prepare(root)
    capsys.readouterr()
    before = snapshot(root)
    code = MAINS[argv[0]](["--config", str(project), *argv[1:]])
    assert_user_error(code, capsys, *needles)
    assert snapshot(root) == before


def test_unseen_categories_are_counted_not_refused(project, capsys):
    root = project.parent
    edit(root, "test.csv", lambda d: at(at(d, 0, shop="nowhere"), 1, shop="nowhere"))
    make_folds(root)
    assert train.main(["--config", str(project), "--fold", "0", "--set", "train.epochs=1"]) == 0
    assert "unseen in training (rare column, or zeros): shop 2" in capsys.readouterr().out
