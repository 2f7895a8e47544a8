"""Defaults that follow the metric and the script: one class-weight rule, TF-IDF by script, C chosen per fold."""

import json

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from sklearn.utils.class_weight import compute_class_weight

from comp import config, folds, metrics
from comp.classical import baselines
from comp.classical.baselines import LinearRun
from comp.classical.text import tfidf_spec, unspaced_share
from comp.nn import objective
from comp.outputs import runs
from comp.tables.read import load_competition
from comp.tables.splits import load_folds
from tests.conftest import make_tables, write_project

CHINESE = {1: ["质量太差了", "非常失望", "不推荐购买"], 2: ["一般般吧", "还可以", "中规中矩"],
           3: ["非常喜欢", "质量很好", "强烈推荐"]}


def test_one_class_weight_rule_for_every_kind_of_run():
    y = np.array([0, 0, 0, 0, 1, 1, 3])  # class 2 absent from these rows
    w = metrics.balanced_weights(y, 4)
    assert w[2] == 0 and np.isclose(w[y].mean(), 1.0)
    present = np.unique(y)
    assert np.allclose(w[present], compute_class_weight("balanced", classes=present, y=y))  # what sklearn runs use
    tcfg = config.TrainConfig(loss="balanced_ce")
    assert np.allclose(objective.class_weights(tcfg, y, 4), w)  # what the encoder's loss uses


def chinese_tables(seed: int = 0) -> dict[str, pd.DataFrame]:
    """The fixture tables with their texts in Chinese (no word spaces)."""
    rng = np.random.default_rng(seed)
    t = make_tables()
    for name in ("train.csv", "test.csv"):
        labels = t[name]["label"] if name == "train.csv" else t["solution.csv"]["label"]
        t[name]["body"] = ["，".join(rng.choice(CHINESE[y], 2)) + "。这件衣服尺码" for y in labels]
        t[name]["title"] = None
    return t


def test_texts_without_word_spaces_switch_the_analyzer_to_characters(tmp_path, tiny_model):
    cfg = config.load(write_project(tmp_path, tiny_model, chinese_tables()), ["model.kind=linear"])
    comp = load_competition(cfg)
    assert unspaced_share(comp.train_text) > 0.8 and unspaced_share(["the dress fits"]) == 0.0
    spec = tfidf_spec(cfg, comp.train_text)
    assert spec["analyzer"] == "char" and spec["char_ngrams"] == [1, 2]
    english = tfidf_spec(cfg, ["the dress fits and the fabric feels lovely"] * 3)
    assert english["analyzer"] == "word+char_wb" and english["char_ngrams"] == [2, 5]
    run = LinearRun(cfg, 0).fit(comp.train, comp.train_text, comp.y)
    assert list(run.text.columns) == ["char"]
    assert "char__质量" in run.feature_names(comp.train_text)  # a two-character term of the text
    fixed = config.load(cfg.root / "comp.toml", ["model.kind=linear", "model.tfidf.analyzer='word+char_wb'"])
    assert tfidf_spec(fixed, comp.train_text)["analyzer"] == "word+char_wb"  # a setting beats auto


def test_the_inner_cv_c_is_fold_local_and_recorded(tmp_path, tiny_model):
    path = write_project(tmp_path, tiny_model)
    assert folds.main(["--config", str(path), "--quiet"]) == 0
    cfg = config.load(path, ["model.kind=linear"])
    comp = load_competition(cfg)
    split, fp = load_folds(cfg, comp)
    record = runs.train_classical_fold(cfg, comp, split, fp, 0, Console(quiet=True))
    chosen = record["tfidf"]["C"]
    assert chosen in baselines.C_GRID and record["tfidf"]["analyzer"] == "word+char_wb"
    va = split == 0
    comp.y = comp.y.copy()
    comp.y[va] = np.random.default_rng(1).permutation(comp.y[va])  # fold 0's validation labels change
    assert runs.train_classical_fold(cfg, comp, split, fp, 0, Console(quiet=True))["tfidf"]["C"] == chosen
    spec = json.loads((cfg.fold_dir(0) / "linear.json").read_text())["tfidf"]
    assert spec["C"] == chosen and spec["char_ngrams"] == [2, 5]


def test_a_linear_run_saved_before_tfidf_settings_loads_as_it_was_trained(tmp_path, tiny_model):
    cfg = config.load(write_project(tmp_path, tiny_model), ["model.kind=linear", "model.tfidf.C=1"])
    comp = load_competition(cfg)
    run = LinearRun(cfg, 0).fit(comp.train, comp.train_text, comp.y)
    run.save(tmp_path)
    expected = run.outputs(comp.test, comp.test_text)
    spec = json.loads((tmp_path / "linear.json").read_text())
    del spec["tfidf"]  # what comp wrote before [model.tfidf]
    (tmp_path / "linear.json").write_text(json.dumps(spec))
    assert np.allclose(LinearRun.load(tmp_path).outputs(comp.test, comp.test_text), expected)


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_auto_loss_reaches_the_classical_runs(tmp_path, tiny_model, metric):
    cfg = config.load(write_project(tmp_path, tiny_model), ["model.kind=linear", f"data.metric={metric}"])
    assert baselines.class_weight(cfg) == ("balanced" if metric == "macro_f1" else None)


def test_a_linear_fold_trained_before_tfidf_settings_still_predicts(tmp_path, tiny_model):
    from comp import predict, train

    path = write_project(tmp_path, tiny_model)
    assert folds.main(["--config", str(path), "--quiet"]) == 0
    before = ["--set", "model.kind=linear", "--set", "model.tfidf.analyzer=word+char_wb",
              "--set", "model.tfidf.char_ngrams=[2, 5]", "--set", "model.tfidf.C=1"]  # the old behaviour
    assert train.main(["--config", str(path), "--all", "--quiet", *before]) == 0
    for k in range(3):  # what comp wrote before [model.tfidf] existed: no tfidf key in the fold's config.toml
        toml = tmp_path / "folds" / "tiny" / f"fold_{k}" / "config.toml"
        toml.write_text("\n".join(line for line in toml.read_text().splitlines() if not line.startswith("tfidf")))
    code = predict.main(["--config", str(path), "--quiet", *before, "--test", str(tmp_path / "data" / "test.csv"),
                         "--out", str(tmp_path / "p.csv")])
    assert code == 0


def test_the_inner_c_search_keeps_each_folds_group_on_one_side(tmp_path, tiny_model, monkeypatch):
    """folds.group: rows of one group (here four copies of a row) must not sit on both sides of the inner split,
    where copies of a validation row in training make memorising look best (the largest C)."""
    from scipy import sparse

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 4)
    y, x = rng.integers(0, 3, 60)[groups], sparse.csr_matrix(rng.normal(size=(60, 40))[groups])  # labels are noise
    assert baselines.inner_cv_c(x, y, None, 0) > 1.0  # copies on both sides: memorising scores well
    assert baselines.inner_cv_c(x, y, None, 0, groups) == min(baselines.C_GRID)  # groups apart: noise, smallest C
    tables = make_tables()
    tables["train.csv"]["batch"] = np.arange(len(tables["train.csv"])) // 3
    cfg = config.load(write_project(tmp_path, tiny_model, tables), ["model.kind=linear", "folds.group=batch"])
    comp = load_competition(cfg)
    seen = []
    real = baselines.inner_cv_c
    monkeypatch.setattr(baselines, "inner_cv_c", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    LinearRun(cfg, 0).fit(comp.train, comp.train_text, comp.y)
    assert np.array_equal(seen[0], comp.train["batch"].to_numpy())


@pytest.mark.parametrize("kind", ["linear", "gbm"])
def test_a_classical_fold_says_what_it_is_doing_on_screen_and_in_its_log(tmp_path, tiny_model, capsys, kind):
    from comp import train

    path = write_project(tmp_path, tiny_model)
    assert folds.main(["--config", str(path), "--quiet"]) == 0
    capsys.readouterr()
    assert train.main(["--config", str(path), "--fold", "0", "--set", f"model.kind={kind}",
                       "--set", "model.gbm.rounds=150"]) == 0
    shown = capsys.readouterr().out
    log = (tmp_path / "folds" / "tiny" / "fold_0" / "train.log").read_text()
    steps = {"linear": ["TF-IDF", "features in", "choosing C among", "chosen in", "fitted on"],
             "gbm": ["TF-IDF", "SVD components", "rounds in"]}[kind]
    for step in steps:
        assert f"fold 0 ({kind}): " in shown and step in shown and step in log, step
