"""comp.init: a config inferred from the tables, each line with its reason; ambiguity, leaks and an existing config
are one line."""

import numpy as np
import pandas as pd
import pytest

from comp import config, folds, init, train
from tests.conftest import assert_user_error, make_tables, snapshot

WORDS = ["plain", "words", "of", "a", "review", "that", "go", "on"]


def tables(**extra) -> dict[str, pd.DataFrame]:
    """The fixture's tables plus columns `extra` (name -> function of the train / test frame)."""
    t = make_tables(n_train=120, n_test=40)
    for name, make in extra.items():
        for key in ("train.csv", "test.csv"):
            t[key][name] = make(t[key])
    return t


def write(tmp_path, t: dict[str, pd.DataFrame], names=("train.csv", "test.csv", "sample_submission.csv")) -> list[str]:
    """The tables as files; the init arguments that name them."""
    for name in names:
        t[name].to_csv(tmp_path / name, index=False)
    flags = {"train.csv": "--train", "test.csv": "--test", "sample_submission.csv": "--sample"}
    return [x for name in names for x in (flags[name], str(tmp_path / name))] + ["--quiet"]


def inferred(tmp_path, t, *args, names=("train.csv", "test.csv", "sample_submission.csv")) -> config.Config:
    assert init.main([*write(tmp_path, t, names), *args]) == 0
    return config.load(tmp_path / "comp.toml")


def test_the_fixture_competition_is_read_as_written_by_hand_and_trains(tmp_path):
    cfg = inferred(tmp_path, tables())
    d = cfg.data
    assert (d.id, d.labels, d.task, d.metric) == ("id", ("label",), "single_label", "macro_f1")
    assert d.text_columns == ("body",) and d.categorical == ("title", "shop") and d.numeric == ("count",)
    text = (tmp_path / "comp.toml").read_text()
    assert "# the sample submission's first column" in text and "body: strings of 120 values" in text
    assert folds.main(["--config", str(tmp_path / "comp.toml"), "--quiet"]) == 0
    assert train.main(["--config", str(tmp_path / "comp.toml"), "--all", "--quiet", "--set", "model.kind=linear"]) == 0


def test_each_column_rule(tmp_path):
    rng = np.random.default_rng(0)
    cfg = inferred(tmp_path, tables(
        note=lambda f: [" ".join(rng.choice(WORDS, 6)) for _ in range(len(f))],       # several words: text
        zh=lambda f: ["这是一条很长的中文评论没有空格" * 3 + str(i) for i in range(len(f))],  # long, no spaces: text
        stars=lambda f: rng.integers(1, 6, len(f)),                                    # few integers: a category
        price=lambda f: rng.normal(size=len(f)),                                       # numbers
        same=lambda f: 1,                                                              # constant: left out
        code=lambda f: [f"x{rng.integers(1e9)}-{i}" for i in range(len(f))]))         # a code per row: left out
    d = cfg.data
    assert set(d.text_columns) == {"body", "note", "zh"}
    assert "stars" in d.categorical and "price" in d.numeric
    text = (tmp_path / "comp.toml").read_text()
    assert "# left out: same (constant)" in text and "# left out: code (a different code on every row" in text
    for col in ("same", "code"):
        assert col not in (*d.text_columns, *d.categorical, *d.numeric)


def test_a_planted_leak_is_left_out_and_named(tmp_path):
    t = tables()
    for key, labels in (("train.csv", t["train.csv"]["label"]), ("test.csv", t["solution.csv"]["label"])):
        t[key]["status"] = labels.map({1: "closed", 2: "open", 3: "paid"}).to_numpy()
    cfg = inferred(tmp_path, t)
    assert "status" not in cfg.data.categorical
    line = next(x for x in (tmp_path / "comp.toml").read_text().splitlines() if x.startswith("# left out: status"))
    assert "likely leak" in line and "skill 1.00" in line
    assert "shop" in cfg.data.categorical and "count" in cfg.data.numeric  # strong features are not leaks


@pytest.mark.parametrize("case", ["multi", "tags", "regression"])
def test_the_task_follows_the_labels(tmp_path, case):
    t = tables()
    y = t["train.csv"].pop("label")
    if case == "multi":
        for c in ("a", "b"):
            t["train.csv"][c] = (y == {"a": 1, "b": 2}[c]).astype(int)
        t["sample_submission.csv"] = t["sample_submission.csv"].drop(columns="label").assign(a=0.5, b=0.5)
    elif case == "tags":
        t["train.csv"]["genres"] = y.map({1: "x", 2: "x|y", 3: "z"})
        t["sample_submission.csv"] = t["sample_submission.csv"].drop(columns="label").assign(x=0, y=0, z=0)
    else:
        t["train.csv"]["price"] = y * 10.5 + np.arange(len(y)) * 0.01
        t["sample_submission.csv"] = t["sample_submission.csv"].rename(columns={"label": "price"})
    d = inferred(tmp_path, t).data
    expected = {"multi": ("multi_label", ("a", "b")), "tags": ("multi_label", ("genres",)),
                "regression": ("regression", ("price",))}[case]
    assert (d.task, d.labels) == expected
    if case == "tags":
        assert d.label_separator == "|"


def test_without_a_sample_the_label_is_the_column_the_test_lacks_and_the_id_the_unique_one(tmp_path):
    d = inferred(tmp_path, tables(), names=("train.csv", "test.csv")).data
    assert d.id == "id" and d.labels == ("label",) and d.sample_submission is None


@pytest.mark.parametrize("case, needle", [
    ("no label", "no label found"), ("two labels", "--label"), ("two ids", "--id"), ("bad label", "--label 'nope'")])
def test_ambiguity_is_one_line_naming_the_flag(tmp_path, capsys, case, needle):
    t = tables()
    args = []
    if case == "no label":
        t["test.csv"]["label"] = 1
    elif case == "two labels":
        t["train.csv"]["other"] = 1
    elif case == "two ids":
        for key in ("train.csv", "test.csv"):  # two unique codes, neither called id
            t[key] = t[key].rename(columns={"id": "key"}).assign(ref=lambda f: [f"r{i}" for i in f["key"]])
    else:
        args = ["--label", "nope"]
    before = snapshot(tmp_path)
    code = init.main([*write(tmp_path, t, ("train.csv", "test.csv")), *args])
    err = assert_user_error(code, capsys, needle)
    assert not (tmp_path / "comp.toml").exists() and len(snapshot(tmp_path)) == len(before) + 2, err
    if case == "two ids":
        assert "key, ref" in err
        assert init.main([*write(tmp_path, t, ("train.csv", "test.csv")), "--id", "key"]) == 0


def test_an_existing_config_is_left_alone_unless_forced(tmp_path, capsys):
    args = write(tmp_path, tables())
    (tmp_path / "comp.toml").write_text("# mine\n")
    assert_user_error(init.main(args), capsys, "comp.toml exists", "--force")
    assert (tmp_path / "comp.toml").read_text() == "# mine\n"
    assert init.main([*args, "--force", "--metric", "accuracy"]) == 0
    assert config.load(tmp_path / "comp.toml").data.metric == "accuracy"


def test_text_mostly_outside_latin_script_is_said_in_the_encoder_line(tmp_path):
    t = tables(body=lambda f: ["这是一条很长的中文评论没有空格" * 3 + str(i) for i in range(len(f))])
    inferred(tmp_path, t)
    line = next(x for x in (tmp_path / "comp.toml").read_text().splitlines() if x.startswith("name_or_path"))
    assert "Latin script" in line and "multilingual-e5-small" in line
