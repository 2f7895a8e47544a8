"""Seed bags: a run under several seeds on the same folds, each seed's stream its own, and the honest CV of their
equal-weight average."""

import json

import numpy as np
import pandas as pd

from comp import config, export, folds, metrics, predict, submit, train
from comp.tables.read import load_competition
from tests.conftest import make_tables, write_project

QUIET = ["--quiet", "--set", "train.epochs=1"]


def test_a_seed_bag_trains_each_seed_and_scores_their_average(tmp_path, tiny_model):
    cfg = write_project(tmp_path, tiny_model, make_tables(n_train=48, n_test=10))
    assert folds.main(["--config", str(cfg), *QUIET]) == 0
    assert train.main(["--config", str(cfg), "--all", "--seeds", "2", *QUIET]) == 0
    base = config.load(cfg)
    runs = [m.run.name for m in config.load(cfg, ["run.seeds=2"]).bag()]
    assert runs == ["tiny", "tiny-s1"]
    seeds = [config.load(tmp_path / "folds" / r / "fold_0" / "config.toml").train.seed for r in runs]
    assert seeds == [base.train.seed, base.train.seed + 1000]
    oof = [np.load(tmp_path / "folds" / r / "fold_0" / "oof_logits.npy") for r in runs]
    assert not np.allclose(oof[0], oof[1])  # two streams, two models

    assert submit.main(["--config", str(cfg), "--seeds", "2", *QUIET]) == 0
    record = json.loads((tmp_path / "folds" / "tiny-bag2" / "blend.json").read_text())
    assert record["runs"] == runs and record["weights"] == [0.5, 0.5] and record["weights_method"] == "equal"
    comp = load_competition(base)
    position = {i: n for n, i in enumerate(comp.train_ids)}
    average = np.zeros((len(comp.y), len(comp.classes)))
    for r in runs:  # the bag's CV: the metric of the seeds' averaged OOF probabilities, no weight fitted
        for k in range(base.folds.n_splits):
            rows = [position[i] for i in np.load(tmp_path / "folds" / r / f"fold_{k}" / "oof_ids.npy")]
            average[rows] += metrics.probabilities(np.load(tmp_path / "folds" / r / f"fold_{k}" / "oof_logits.npy")) / 2
    assert np.isclose(record["cv"]["log_loss"], metrics.log_loss(comp.y, average))
    assert (tmp_path / "submissions" / "tiny-bag2.csv").is_file()
    assert export.main(["--config", str(cfg), "--blend", "tiny-bag2", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    data = tmp_path / "data"
    assert predict.main(["--bundle", str(tmp_path / "b"), "--quiet", "--test", str(data / "test.csv"),
                         "--sample", str(data / "sample_submission.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "submissions" / "tiny-bag2.csv"))


def test_no_two_seed_fold_pairs_share_a_stream_and_zero_seeds_is_one_line(project, capsys):
    from tests.conftest import assert_user_error, snapshot

    cfg = config.load(project, ["run.seeds=5", "folds.n_splits=10"])
    streams = [m.train.seed + k for m in cfg.bag() for k in range(cfg.folds.n_splits)]  # what fold k of each seeds
    assert len(set(streams)) == len(streams) == 50
    assert folds.main(["--config", str(project), "--quiet"]) == 0
    before = snapshot(project.parent)
    assert_user_error(train.main(["--config", str(project), "--all", "--seeds", "0", "--quiet"]), capsys,
                      "run.seeds must be >= 1")
    assert snapshot(project.parent) == before
