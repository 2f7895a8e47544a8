"""Every kind of competition: regression and multi-label beside single-label. Metrics against scikit-learn and
scipy, the losses, the folds of each task, and folds → train → submit → predict through the CLIs on the tiny
model, with the user errors of each task."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import pearsonr
from sklearn.metrics import (
    cohen_kappa_score,
    f1_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)

from comp import blend, config, export, folds, metrics, predict, submit, train
from comp.config import TrainConfig
from comp.nn.objective import make_loss
from comp.nn.state import EarlyStopping
from comp.outputs import decide
from comp.tables import read as tables
from comp.tables import splits
from tests.conftest import assert_user_error, make_tables, snapshot, write_project

TAGS = {1: "bad", 2: "", 3: "good"}


def task_tables(task: str, seed: int = 0) -> dict[str, pd.DataFrame]:
    """The fixture competition with its label turned into a number (regression) or tags (multi_label: the
    sentiment's tag, and "north" where the shop is north; some rows have no tag)."""
    t = make_tables(seed=seed)
    rng = np.random.default_rng(seed)

    def target(df):
        if task == "regression":
            return df["label"] * 1.5 + rng.normal(0, 0.2, len(df))
        return [" ".join(x for x in (TAGS[y], "north" if s == "north" else "") if x)
                for y, s in zip(df["label"], df["shop"], strict=True)]

    full = pd.concat([t["train.csv"], t["solution.csv"].merge(t["test.csv"], on="id")], ignore_index=True)
    full["label"] = target(full)
    train_df = full.iloc[:len(t["train.csv"])]
    solution = full.iloc[len(t["train.csv"]):][["id", "label"]]
    ids = t["sample_submission.csv"]["id"]
    sample = (pd.DataFrame({"id": ids, "label": 0.0}) if task == "regression"
              else pd.DataFrame({"id": ids, **{tag: 0.5 for tag in ("bad", "good", "north")}}))
    return {"train.csv": train_df, "test.csv": t["test.csv"], "sample_submission.csv": sample, "solution.csv": solution}


def task_project(root, model, task: str, extra: str = "") -> str:
    cfg = write_project(root, model, task_tables(task))
    text = cfg.read_text().replace('label = "label"\n', f'label = "label"\ntask = "{task}"\n{extra}')
    cfg.write_text(text)
    return str(cfg)


@pytest.fixture(scope="module", params=["regression", "multi_label"])
def trained_task(request, tmp_path_factory, tiny_model):
    """A project of each task with folds made, every fold trained and submitted through the CLIs."""
    cfg = task_project(tmp_path_factory.mktemp(request.param), tiny_model, request.param)
    assert folds.main(["--config", cfg]) == 0
    assert train.main(["--config", cfg, "--all"]) == 0
    assert submit.main(["--config", cfg]) == 0
    return request.param, cfg


# --- metrics ---------------------------------------------------------------------------------------------

def test_label_and_probability_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(200, 4)).astype(np.float32)
    y[:, 3] = 0  # a label never present: left out of the mean AUC
    p = np.clip(y * 0.3 + rng.uniform(0, 0.7, size=y.shape), 1e-6, 1 - 1e-6)
    got = metrics.score_predictions(y, p, "multi_label")
    assert got["roc_auc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], p[:, j]) for j in range(3)]))
    assert got["log_loss"] == pytest.approx(np.mean([log_loss(y[:, j], p[:, j], labels=[0, 1]) for j in range(4)]))
    assert got["macro_f1"] == pytest.approx(f1_score(y, p >= 0.5, average="macro", zero_division=0))
    assert set(got) == set(metrics.names("multi_label"))

    yb = rng.integers(0, 2, size=300)
    probs = metrics.probabilities(rng.normal(size=(300, 2)) + np.eye(2)[yb])
    binary = metrics.score_predictions(yb, probs, "single_label")
    assert binary["roc_auc"] == pytest.approx(roc_auc_score(yb, probs[:, 1]))
    assert binary["f1"] == pytest.approx(f1_score(yb, probs.argmax(1)))
    assert "f1" not in metrics.score_predictions(np.arange(3) % 3, np.eye(3), "single_label")  # binary only


def test_regression_metrics_match_scikit_learn_and_scipy():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(150, 3)) * [1.0, 5.0, 0.1]
    p = y + rng.normal(size=y.shape) * [0.5, 2.0, 0.1]
    got = metrics.score_predictions(y, p, "regression")
    assert got["mcrmse"] == pytest.approx(np.mean(np.sqrt(mean_squared_error(y, p, multioutput="raw_values"))))
    assert got["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, p)))
    assert got["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert got["r2"] == pytest.approx(r2_score(y, p))
    assert got["pearson"] == pytest.approx(np.mean([pearsonr(y[:, j], p[:, j])[0] for j in range(3)]))
    ratings = rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], size=(200, 1))
    values = ratings + rng.normal(0, 0.8, ratings.shape)
    rounded = np.clip(np.floor(values + 0.5), 1, 5)  # the nearest rating (ties down: none at this noise)
    assert metrics.score_predictions(ratings, values, "regression")["qwk"] == pytest.approx(
        cohen_kappa_score(ratings[:, 0], rounded[:, 0], weights="quadratic"))
    assert np.isnan(metrics.score_predictions(y[:, :1], p[:, :1], "regression")["qwk"])  # 150 levels: not ordinal
    one = metrics.score_predictions(y[:, 0], p[:, :1], "regression")  # one target given as a vector
    assert one["rmse"] == pytest.approx(one["mcrmse"]) == pytest.approx(np.sqrt(mean_squared_error(y[:, 0], p[:, 0])))


def test_early_stopping_follows_the_metrics_direction():
    for name, direction in (("val_rmse", "min"), ("val_roc_auc", "max"), ("val_r2", "max"), ("val_mae", "min")):
        stopper = EarlyStopping(name, patience=1)
        better, worse = (0.5, 0.7) if direction == "min" else (0.7, 0.5)
        assert stopper.step(better, 1) and not stopper.step(worse, 2) and stopper.best_epoch == 1, name
        assert config.MONITORS[name] == direction


def test_losses_of_each_task():
    rng = np.random.default_rng(2)
    y = rng.normal(3.0, 2.0, size=(64, 2)).astype(np.float32)
    pred = torch.from_numpy(y + rng.normal(size=y.shape).astype(np.float32))
    mse = make_loss(TrainConfig(loss="mse"), y, 2, torch.device("cpu"))
    assert float(mse(pred, torch.from_numpy(y))) == pytest.approx(float(((pred.numpy() - y) ** 2 / y.var(0)).mean()), rel=1e-4)
    tags = (rng.uniform(size=(64, 3)) < [0.5, 0.2, 0.1]).astype(np.float32)
    logits = torch.from_numpy(rng.normal(size=(64, 3)).astype(np.float32))
    bce = make_loss(TrainConfig(loss="ce"), tags, 3, torch.device("cpu"))
    assert float(bce(logits, torch.from_numpy(tags))) == pytest.approx(
        metrics.log_loss(tags, metrics.activate("multi_label", logits.numpy())), rel=1e-5)
    balanced = make_loss(TrainConfig(loss="balanced_ce"), tags, 3, torch.device("cpu"))
    assert torch.allclose(balanced.pos_weight, torch.from_numpy((64 - tags.sum(0)) / tags.sum(0)))


# --- folds -----------------------------------------------------------------------------------------------

def test_iterative_folds_keep_every_labels_share():
    """Each fold holds each label's rows to within 1.5 of an equal share (a random split misses by several)."""
    rng = np.random.default_rng(3)
    y = (rng.uniform(size=(1000, 8)) < np.linspace(0.02, 0.4, 8)).astype(np.float32)
    fold = splits.iterative_folds(y, 5, seed=0)
    assert sorted(np.unique(fold)) == list(range(5)) and np.all(np.bincount(fold) >= 195)
    for k in range(5):
        assert np.all(np.abs(y[fold == k].sum(0) - y.sum(0) / 5) <= 1.5), k
    assert np.array_equal(fold, splits.iterative_folds(y, 5, seed=0))


def test_regression_folds_keep_the_targets_quantiles(tmp_path, tiny_model):
    cfg = config.load(task_project(tmp_path, tiny_model, "regression"))
    comp = tables.load_competition(cfg)
    fold = splits.split_rows(cfg, comp)
    bins = tables.strata("regression", comp.y)
    for k in range(3):  # each fold has its share of every quantile bin, to within one row
        counts, expected = np.bincount(bins[fold == k], minlength=10), np.bincount(bins, minlength=10) / 3
        assert np.all(np.abs(counts - expected) <= 1), k


def test_multi_label_group_never_spans_two_folds(tmp_path, tiny_model):
    cfg_path = task_project(tmp_path, tiny_model, "multi_label")
    train_csv = tmp_path / "data" / "train.csv"
    df = pd.read_csv(train_csv)
    df["author"] = [f"a{i % 17}" for i in range(len(df))]
    df.to_csv(train_csv, index=False)
    cfg = config.load(cfg_path, ["folds.group=author"])
    comp = tables.load_competition(cfg)
    fold = splits.split_rows(cfg, comp)
    assert all(len(set(fold[df["author"] == a])) == 1 for a in df["author"].unique())


# --- end to end ------------------------------------------------------------------------------------------

def test_each_task_trains_submits_and_predicts(trained_task, tmp_path):
    task, cfg_path = trained_task
    cfg = config.load(cfg_path)
    comp = tables.load_competition(cfg)
    n_out = 1 if task == "regression" else 3
    assert comp.classes == (["label"] if task == "regression" else ["bad", "good", "north"])
    logits = []
    for k in range(3):
        out = cfg.fold_dir(k)
        record = json.loads((out / "metrics.json").read_text())
        assert record["task"] == task and set(metrics.names(task)) <= set(record["oof"])
        assert np.load(out / "oof_logits.npy").shape == (int((np.load(out / "oof_ids.npy")).size), n_out)
        logits.append(np.load(out / "test_logits.npy"))
        best = record["history"][record["best_epoch"] - 1]["val_loss"]
        assert best == min(h["val_loss"] for h in record["history"])  # monitor val_loss: lowest kept
    frame = pd.read_csv(cfg.submission_path)
    sample = pd.read_csv(cfg.path(cfg.data.sample_submission))
    assert list(frame.columns) == list(sample.columns) and frame["id"].tolist() == sample["id"].tolist()
    expected = np.mean([metrics.activate(task, lg) for lg in logits], axis=0)  # the fold average
    pos = pd.Series(range(len(comp.test_ids)), index=comp.test_ids.astype(int))[frame["id"]].to_numpy()
    got = frame[[c for c in frame.columns if c != "id"]].to_numpy()
    np.testing.assert_allclose(got, expected[pos], rtol=1e-5, atol=1e-6)
    if task == "multi_label":
        assert ((got >= 0) & (got <= 1)).all()
    test, sample = str(cfg.path(cfg.data.test)), str(cfg.path(cfg.data.sample_submission))
    assert export.main(["--config", cfg_path, "--out", str(tmp_path / "bundle")]) == 0
    for source in (["--config", cfg_path], ["--bundle", str(tmp_path / "bundle")]):
        out = tmp_path / "predicted.csv"
        assert predict.main([*source, "--test", test, "--out", str(out), "--sample", sample]) == 0
        np.testing.assert_allclose(pd.read_csv(out).drop(columns="id").to_numpy(), got, rtol=1e-4, atol=1e-5)


def test_each_task_beats_a_constant_with_the_linear_run(trained_task):
    task, cfg_path = trained_task
    args = ["--config", cfg_path, "--set", "run.name=lin", "--set", "model.kind=linear"]
    assert train.main([*args, "--all"]) == 0
    result = submit.submit(config.load(cfg_path, ["run.name=lin", "model.kind=linear"]))
    metric = "rmse" if task == "regression" else "roc_auc"
    better = np.less if metrics.DIRECTION[metric] == "min" else np.greater
    assert better(result["cv"][metric], result["baseline"]), (result["cv"], result["baseline"])


def test_tags_in_one_answer_column_and_a_tag_list_format(tmp_path, tiny_model):
    """A tag column written as lists ["a", "b"] reads like one joined by the separator; a one-column sample
    submission takes the tags of probability >= 0.5."""
    cfg_path = task_project(tmp_path, tiny_model, "multi_label")
    train_csv = tmp_path / "data" / "train.csv"
    df = pd.read_csv(train_csv, keep_default_na=False)
    before = tables.load_competition(config.load(cfg_path)).y
    df["label"] = [json.dumps(t.split()) for t in df["label"]]
    df.to_csv(train_csv, index=False)
    cfg = config.load(cfg_path)
    comp = tables.load_competition(cfg)
    assert np.array_equal(comp.y, before)
    comp.sample = pd.DataFrame({"id": comp.test_ids, "label": ""})
    probs = np.tile([[0.9, 0.1, 0.6]], (len(comp.test_ids), 1))
    from comp.outputs.collect import submission_frame
    assert set(submission_frame(cfg, comp, probs)["label"]) == {"bad north"}


# --- user errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("task, cell, needle", [
    ("regression", "about four", "regression target 'label' holds text"),
    ("multi_label", "[bad, 'good'", "neither a list"),
])
def test_bad_targets_are_one_line(tmp_path, tiny_model, capsys, task, cell, needle):
    cfg = task_project(tmp_path, tiny_model, task)
    train_csv = tmp_path / "data" / "train.csv"
    df = pd.read_csv(train_csv, dtype={"label": str}, keep_default_na=False)
    df.loc[3, "label"] = cell
    df.to_csv(train_csv, index=False)
    before = snapshot(tmp_path)
    assert_user_error(folds.main(["--config", cfg]), capsys, needle)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("sets, needle", [
    (["data.task=regression", "data.metric=accuracy"], "data.metric 'accuracy' does not fit data.task = 'regression'"),
    (["data.task=multi_label", "data.metric=rmse"], "does not fit data.task = 'multi_label'"),
    (["data.task=regression", "train.loss=focal"], "train.loss = 'focal' does not fit"),
    (["data.task=regression", "train.monitor=val_macro_f1"], "train.monitor 'val_macro_f1' does not fit"),
    (["data.task=single_label", "data.label=['a', 'b']"], "takes one"),
    (["data.task=ranking"], "data.task must be one of"),
    (["data.task=multi_label", "model.kind=gbm"], "model.kind = \"gbm\" needs"),
])
def test_config_that_does_not_fit_the_task_is_one_line(project, capsys, sets, needle):
    before = snapshot(project.parent)
    code = folds.main(["--config", str(project), *(a for s in sets for a in ("--set", s))])
    assert_user_error(code, capsys, needle)
    assert snapshot(project.parent) == before


def test_monitor_metric_follows_data_metric(project):
    cfg = config.load(project, ["data.task=regression", "data.metric=mae", "train.monitor=metric"])
    assert cfg.train.monitor == "val_mae" and cfg.train.loss == "mse"
    assert config.load(project, ["data.task=multi_label"]).data.metric == "roc_auc"
    assert config.load(project, ["data.task=regression", "data.label=['a', 'b']"]).data.metric == "mcrmse"


def test_multi_label_thresholds_are_cross_fitted_and_raise_f1():
    """Fold k's thresholds come from the other folds only: changing fold k's OOF rows leaves them unchanged."""
    rng = np.random.default_rng(4)
    y = (rng.uniform(size=(600, 3)) < [0.3, 0.1, 0.5]).astype(np.float32)
    probs = np.clip(0.15 + 0.3 * y + rng.normal(0, 0.12, y.shape), 0, 1)  # truth sits below 0.5: 0.5 misses it
    fold = np.arange(600) % 3
    labels, rules = decide.cross_fit(y, fold, probs, "macro_f1", "multi_label")
    changed = probs.copy()
    changed[fold == 0] = rng.uniform(size=changed[fold == 0].shape)
    _, again = decide.cross_fit(y, fold, changed, "macro_f1", "multi_label")
    assert again[0] == rules[0] and again[1] != rules[1]
    rule = decide.decide("macro_f1", y, fold, probs, "multi_label")
    assert rule["kind"] == "thresholds" and rule["cv_after"] > rule["cv_before"] + 0.1
    assert rule["cv_after"] == pytest.approx(metrics.multi_label_f1(y, labels))


def test_qwk_cuts_on_a_regression_value_are_cross_fitted():
    """A regression of 1-5 ratings shrunk towards the mean: rounding under-predicts the ends, cuts fitted on the
    other folds recover them; the decided values are the ratings themselves."""
    rng = np.random.default_rng(5)
    y = rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], size=(900, 1), p=[0.1, 0.1, 0.2, 0.3, 0.3])
    values = 3.6 + 0.45 * (y - 3.6) + rng.normal(0, 0.3, y.shape)
    fold = np.arange(900) % 3
    rule = decide.decide("qwk", y, fold, values, "regression")
    assert rule["kind"] == "cuts" and rule["levels"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert rule["cv_after"] > rule["cv_before"] + 0.05
    decided, rules = decide.cross_fit(y, fold, values, "qwk", "regression")
    assert set(np.unique(decided)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    changed = values.copy()
    changed[fold == 1] += 1.0
    assert decide.cross_fit(y, fold, changed, "qwk", "regression")[1][1] == rules[1]
    assert metrics.score_predictions(y, decided, "regression")["qwk"] == pytest.approx(rule["cv_after"])


def test_decide_writes_labels_for_multi_label_and_needs_qwk_for_regression(trained_task, capsys):
    task, cfg_path = trained_task
    if task == "regression":
        assert_user_error(submit.main(["--config", cfg_path, "--decide"]), capsys, "QWK cut points", "data.metric")
        return
    # scored by another metric than it trained for: the loss it trained with (auto, for roc_auc: ce) is named
    other = ["data.metric=macro_f1", "train.loss=ce"]
    cfg = config.load(cfg_path, other)
    assert submit.main(["--config", cfg_path, *(a for o in other for a in ("--set", o)), "--decide"]) == 0
    frame = pd.read_csv(cfg.submission_path)
    assert set(np.unique(frame.drop(columns="id").to_numpy())) <= {0.0, 1.0}
    assert json.loads((cfg.run_dir / "decision.json").read_text())["kind"] == "thresholds"
    assert submit.main(["--config", cfg_path]) == 0  # a plain submit again: probabilities, no decision.json
    assert not (cfg.run_dir / "decision.json").exists()


@pytest.mark.parametrize("task", ["regression", "multi_label"])
def test_several_label_columns(tmp_path, tiny_model, task):
    """Two regression targets (MCRMSE by default), or one 0/1 column per label: split, trained, submitted per
    column and scored against a solution with those columns."""
    t = task_tables(task)
    for name in ("train.csv", "solution.csv"):
        df = t[name].copy()
        if task == "regression":
            df["second"] = df["label"] * -2.0 + 1.0
        else:
            for tag in ("bad", "good", "north"):
                df[tag] = [int(tag in str(v).split()) for v in df["label"]]
            df = df.drop(columns="label")
        t[name] = df
    cols = ["label", "second"] if task == "regression" else ["bad", "good", "north"]
    t["sample_submission.csv"] = pd.DataFrame({"id": t["sample_submission.csv"]["id"], **{c: 0 for c in cols}})
    cfg_path = write_project(tmp_path, tiny_model, t)
    cfg_path.write_text(cfg_path.read_text().replace('label = "label"\n', f'label = {json.dumps(cols)}\ntask = "{task}"\n'))
    args = ["--config", str(cfg_path), "--set", "model.kind=linear"]
    assert folds.main(args) == 0 and train.main([*args, "--all"]) == 0
    result = submit.submit(config.load(cfg_path, ["model.kind=linear"]))
    metric = "mcrmse" if task == "regression" else "roc_auc"
    assert config.load(cfg_path).data.metric == metric and set(result["leaderboard"]) == set(metrics.names(task))
    frame = pd.read_csv(config.load(cfg_path).submission_path)
    assert list(frame.columns) == ["id", *cols] and frame[cols].notna().all().all()


def test_blend_of_a_task_fits_weights_and_refuses_a_stack(trained_task, capsys):
    """Two runs of the task blend with weights fitted to its loss (honest CV at least near the better run's);
    a stack is single_label's and refused in one line."""
    task, cfg_path = trained_task
    args = ["--config", cfg_path, "--set", "run.name=lin2", "--set", "model.kind=linear"]
    assert train.main([*args, "--all"]) == 0
    name = config.load(cfg_path).run.name
    assert_user_error(blend.main(["--config", cfg_path, "--runs", f"{name},lin2", "--stack", "--name", "s"]), capsys,
                      "--stack needs data.task")
    record = blend.blend(config.load(cfg_path, ["run.name=mix"]), [name, "lin2"], "fit")
    assert record["weights_method"] == "fit" and sum(record["weights"]) == pytest.approx(1.0)
    chosen = blend.blend(config.load(cfg_path, ["run.name=auto"]), [name, "lin2"])  # the default: auto, no stack
    assert chosen["auto"]["chosen"] != "stack" and "stack" not in chosen["auto"]["candidates"]
    assert sum(chosen["weights"]) == pytest.approx(1.0)
    metric = config.load(cfg_path).data.metric
    sign = 1 if metrics.DIRECTION[metric] == "max" else -1
    best = max(sign * record["member_cv"][n][metric] for n in (name, "lin2"))
    assert sign * record["cv"][metric] >= best - 0.05
