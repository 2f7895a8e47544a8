"""Classical runs on the same folds, the stack's honest CV, and the metadata encodings the encoder run uses."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression

from comp import blend, config, folds, submit, train
from comp.classical import stacking
from comp.nn.model import build_model, init_wide
from comp.outputs import collect as outputs
from comp.tables.features import MetaEncoder
from tests.conftest import assert_user_error, snapshot, write_project


def cli(cfg, main, *args):
    return main(["--config", str(cfg), "--quiet", *args])


@pytest.fixture(scope="module")
def classical(tmp_path_factory, tiny_model):
    """The tiny project with an encoder run and a linear and a gbm run on the same folds."""
    cfg = write_project(tmp_path_factory.mktemp("classical"), tiny_model)
    assert folds.main(["--config", str(cfg)]) == 0
    assert cli(cfg, train.main, "--all") == 0
    for kind in ("linear", "gbm"):
        assert cli(cfg, train.main, "--all", "--set", f"model.kind={kind}", "--set", f"run.name={kind}") == 0
    return cfg


@pytest.mark.parametrize("kind", ["linear", "gbm"])
def test_classical_runs_write_checked_fold_artifacts_that_submit_accepts(classical, kind):
    cfg = classical
    loaded = config.load(cfg, [f"model.kind={kind}", f"run.name={kind}"])
    for k in range(loaded.folds.n_splits):
        record = outputs.verify_fold(loaded, k)
        assert record["kind"] == kind and set(record["sha256"]) == set(outputs.checked_files(kind))
        oof = np.load(loaded.fold_dir(k) / "oof_logits.npy")
        assert oof.shape[1] == 3 and np.allclose(np.exp(oof).sum(1), 1.0, atol=1e-4)  # log-probabilities
    result = submit.submit(loaded)
    assert result["cv"]["accuracy"] > 0.6  # the fixture's words and shops give the label away
    assert len(pd.read_csv(result["path"])) == 30


def test_classical_runs_blend_and_stack_with_an_encoder_run(classical, capsys):
    cfg = classical
    assert cli(cfg, blend.main, "--runs", "tiny,linear,gbm", "--name", "mix") == 0
    assert cli(cfg, blend.main, "--runs", "tiny,linear,gbm", "--name", "stacked", "--stack") == 0
    record = json.loads((cfg.parent / "folds" / "stacked" / "blend.json").read_text())
    stack = record["stack"]
    assert (stack["level2"], stack["class_weight"]) == ("logistic", "balanced")  # loss auto: macro-F1 weighs classes
    assert set(stack["sha256"]) == {"stack.json", "stack.safetensors"}
    assert record["cv"]["accuracy"] > 0.6
    sub = pd.read_csv(cfg.parent / "submissions" / "stacked.csv")
    assert sub["label"].isin([1, 2, 3]).all() and len(sub) == 30


def test_a_tampered_classical_model_is_refused(classical, capsys):
    cfg = classical
    path = cfg.parent / "folds" / "linear" / "fold_1" / "linear.safetensors"
    original = path.read_bytes()
    path.write_bytes(original + b"x")
    try:
        code = cli(cfg, submit.main, "--set", "model.kind=linear", "--set", "run.name=linear")
        assert_user_error(code, capsys, "linear.safetensors", "checksum")
    finally:
        path.write_bytes(original)


def test_stack_never_fits_fold_k_on_fold_ks_rows():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    fold = np.arange(400) % 4
    probs = [softmax(np.eye(3)[y] * s + rng.normal(size=(400, 3)), axis=1) for s in (1.0, 2.0)]
    _, models = stacking.cross_fit("logistic", y, fold, probs, 3, None, 0)
    changed = [p.copy() for p in probs]
    changed[0][fold == 0] = softmax(rng.normal(size=((fold == 0).sum(), 3)) * 5, axis=1)
    _, after = stacking.cross_fit("logistic", y, fold, changed, 3, None, 0)
    assert np.array_equal(models[0].model.coef_, after[0].model.coef_)  # fold 0's level-2 model: folds 1-3 only
    assert not np.allclose(models[1].model.coef_, after[1].model.coef_)  # fold 1's saw fold 0's rows


def test_stack_learns_which_member_to_trust():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    fold = np.arange(600) % 3
    good = softmax(np.eye(3)[y] * 3 + rng.normal(size=(600, 3)), axis=1)
    noise = softmax(rng.normal(size=(600, 3)), axis=1)
    for kind in stacking.LEVEL2:
        honest, _ = stacking.cross_fit(kind, y, fold, [noise, good], 3, None, 0)
        assert (honest.argmax(1) == y).mean() >= (good.argmax(1) == y).mean() - 0.03


def test_rare_categories_share_one_column_and_unseen_ones_join_it():
    df = pd.DataFrame({"c": ["a"] * 10 + ["b"] * 10 + ["r1", "r2"], "n": np.arange(22.0)})
    every = MetaEncoder(("c",), (), min_category_rows=1).fit(df)
    bucket = MetaEncoder(("c",), (), min_category_rows=5).fit(df)
    assert every.width == 4 and bucket.width == 3
    rows = bucket.transform(pd.DataFrame({"c": ["r1", "r2", "never"], "n": [0.0] * 3}))
    assert (rows == rows[0]).all() and rows[0].sum() == 1  # both rare values and an unseen one: the rare column


def test_quantile_transform_tames_skewed_numerics_and_flags_missing_values():
    rng = np.random.default_rng(0)
    values = np.exp(rng.normal(0, 2, 500))
    values[::10] = np.nan
    df = pd.DataFrame({"x": values})
    standard = MetaEncoder((), ("x",), numeric_transform="standard").fit(df).transform(df)
    quantile = MetaEncoder((), ("x",), numeric_transform="quantile").fit(df).transform(df)
    assert standard.shape[1] == 1 and quantile.shape[1] == 2  # the value and its missing-value indicator
    assert np.abs(standard[:, 0]).max() > 8 and np.abs(quantile[:, 0]).max() < 6
    assert (quantile[:, 1] == np.isnan(values)).all()


def test_config_passes_the_metadata_keys_to_the_encoder(project):
    cfg = config.load(project, ["model.min_category_rows=3", "model.numeric_transform=standard"])
    enc = MetaEncoder.from_config(cfg)
    assert (enc.min_category_rows, enc.numeric_transform) == (3, "standard")


def test_fitted_wide_path_starts_at_the_logistic_regression_of_the_metadata(project):
    cfg = config.load(project)
    rng = np.random.default_rng(0)
    meta = rng.normal(size=(60, 4)).astype(np.float32)
    y = (meta[:, 0] > 0).astype(int) + (meta[:, 1] > 0)
    ids, mask = torch.ones(60, 3, dtype=torch.long), torch.ones(60, 3, dtype=torch.long)
    logits, models = {}, {}
    for wide in ("fitted", "zero", "off"):
        torch.manual_seed(0)
        models[wide] = build_model(dataclasses.replace(cfg.model, wide=wide), 4, 3, root=cfg.root).eval()
        init_wide(models[wide], meta, y, 3, balanced=False, seed=0)
        with torch.no_grad():
            logits[wide] = models[wide](ids, mask, torch.from_numpy(meta)).numpy()
    lr = LogisticRegression(C=1.0, max_iter=1000).fit(meta, y)
    fitted = models["fitted"].wide
    assert np.allclose(fitted.weight.detach().numpy(), lr.coef_, atol=1e-5)
    assert np.allclose(fitted.bias.detach().numpy(), lr.intercept_, atol=1e-5)
    assert not models["zero"].wide.weight.any() and models["off"].wide is None
    # the wide path adds the regression's logits to the deep path's, which all three share (same seed)
    assert np.allclose(logits["fitted"] - logits["off"], lr.decision_function(meta), atol=1e-4)
    assert np.allclose(logits["zero"], logits["off"], atol=1e-6)


def test_balanced_wide_path_weights_the_classes(tiny_model):
    from comp.config import ModelConfig

    rng = np.random.default_rng(1)
    meta = rng.normal(size=(200, 3)).astype(np.float32)
    y = np.where(np.arange(200) < 20, 1, 0)
    biases = {}
    for balanced in (False, True):
        model = build_model(ModelConfig(name_or_path=str(tiny_model), head_hidden=(4,), max_length=48), 3, 2)
        init_wide(model, meta, y, 2, balanced=balanced, seed=0)
        biases[balanced] = model.wide.bias.detach().numpy()
    assert biases[True][1] - biases[True][0] > biases[False][1] - biases[False][0]  # the rare class gains


def test_bad_model_kind_is_one_line_and_writes_nothing(project, capsys):
    assert folds.main(["--config", str(project)]) == 0
    before = snapshot(project.parent)
    code = cli(project, train.main, "--fold", "0", "--set", "model.kind=forest")
    assert_user_error(code, capsys, "model.kind", "forest", "linear")
    assert snapshot(project.parent) == before


def test_linear_run_with_no_text_and_no_metadata_is_refused(project, capsys):
    for name in ("train.csv", "test.csv"):
        path = project.parent / "data" / name
        pd.read_csv(path).assign(title=None, body=None).to_csv(path, index=False)
    sets = ["--set", "data.allow_empty_text=true", "--set", "data.categorical=[]", "--set", "data.numeric=[]",
            "--set", "model.kind=linear"]
    assert folds.main(["--config", str(project), *sets]) == 0
    before = snapshot(project.parent)
    assert_user_error(cli(project, train.main, "--fold", "0", *sets), capsys, "model.kind = 'linear'", "text or metadata")
    assert snapshot(project.parent) == before


def test_stack_over_runs_on_different_folds_is_refused(classical, tmp_path, capsys):
    cfg = classical
    other = tmp_path / "other.toml"
    other.write_text(cfg.read_text().replace("seed = 7", "seed = 8").replace('[folds]', '[folds]\npath = "folds/b/folds.csv"'))
    (tmp_path / "data").symlink_to(cfg.parent / "data")
    assert folds.main(["--config", str(other)]) == 0
    assert cli(other, train.main, "--all", "--set", "model.kind=linear", "--set", "run.name=linear") == 0
    (tmp_path / "folds" / "b" / "tiny").symlink_to(cfg.parent / "folds" / "tiny")  # run tiny: the other split
    before = snapshot(tmp_path)
    code = cli(other, blend.main, "--runs", "linear,tiny", "--name", "st", "--stack")
    assert_user_error(code, capsys, "tiny", "another split")
    assert snapshot(tmp_path) == before


def test_an_exported_stack_predicts_what_the_blend_submitted(classical, tmp_path):
    from comp import export, predict

    cfg = classical
    assert cli(cfg, blend.main, "--runs", "tiny,linear", "--name", "st2", "--stack") == 0
    assert cli(cfg, export.main, "--blend", "st2", "--out", str(tmp_path / "b")) == 0
    data = cfg.parent / "data"
    code = predict.main(["--bundle", str(tmp_path / "b"), "--test", str(data / "test.csv"), "--quiet",
                         "--sample", str(data / "sample_submission.csv"), "--out", str(tmp_path / "s.csv")])
    assert code == 0
    assert pd.read_csv(tmp_path / "s.csv").equals(pd.read_csv(cfg.parent / "submissions" / "st2.csv"))


def test_an_exported_gbm_run_predicts_what_submit_wrote_without_a_pickle(classical, tmp_path):
    from comp import export, predict

    cfg, gbm = classical, ["--set", "model.kind=gbm", "--set", "run.name=gbm"]
    assert cli(cfg, submit.main, *gbm) == 0
    assert cli(cfg, export.main, "--run", "gbm", "--out", str(tmp_path / "b")) == 0
    files = [p for p in (tmp_path / "b").rglob("*") if p.is_file()]
    assert any(p.name == "gbm.txt" for p in files) and not any(p.read_bytes()[:1] == b"\x80" for p in files)
    data = cfg.parent / "data"
    assert predict.main(["--bundle", str(tmp_path / "b"), "--test", str(data / "test.csv"), "--quiet",
                         "--sample", str(data / "sample_submission.csv"), "--out", str(tmp_path / "s.csv")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "s.csv"), pd.read_csv(cfg.parent / "submissions" / "gbm.csv"))


def test_a_gbm_run_stops_its_rounds_on_the_folds_validation_rows(classical):
    from comp.classical.baselines import GbmRun

    cfg = config.load(classical, ["model.kind=gbm", "run.name=gbm"])
    run = GbmRun.load(cfg.fold_dir(0))
    assert 0 < run.booster.num_trees() < 2000 * len(run.classes_)  # early stopping ended it


def test_a_gbm_fold_reloaded_in_a_fresh_process_predicts_the_probabilities_it_wrote(classical):
    import subprocess
    import sys

    cfg = config.load(classical, ["model.kind=gbm", "run.name=gbm"])
    code = ("import sys, numpy as np; from pathlib import Path; from comp import config; "
            "from comp.classical.baselines import load_classical; from comp.tables.read import load_competition; "
            "cfg = config.load(sys.argv[1], ['model.kind=gbm', 'run.name=gbm']); comp = load_competition(cfg); "
            "m = load_classical('gbm', cfg.fold_dir(1), len(comp.classes)); "
            "np.save(sys.argv[2], m.logits(comp.test, comp.test_text))")
    out = cfg.root / "fresh.npy"
    subprocess.run([sys.executable, "-c", code, str(classical), str(out)], check=True)
    assert np.allclose(np.load(out), np.load(cfg.fold_dir(1) / "test_logits.npy"), atol=1e-6)
