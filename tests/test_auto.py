"""comp.auto under a fake clock: it sizes or skips the encoder by the budget, stops at a fold boundary and resumes,
and leaves the submission, the bundle and a table of its members."""

import json
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from comp import auto, train
from comp.config import load
from comp.nn import state
from comp.outputs import runs
from comp.outputs.costs import EncoderSpeed
from tests.conftest import write_project


class FakeClock:
    """A clock that moves only when told: each classical fold "takes" `per_fold` seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clocked(monkeypatch):
    """A fake clock shared by comp.auto and comp.train, moved on by every classical fold it trains."""
    clock = FakeClock()
    monkeypatch.setattr(train, "time", SimpleNamespace(monotonic=clock, perf_counter=time.perf_counter))
    monkeypatch.setattr(state, "time", SimpleNamespace(monotonic=clock))  # where a checkpoint checks the deadline
    fold = runs.train_classical_fold

    def timed(*a, **k):
        clock.now += clock.per_fold
        return fold(*a, **k)
    monkeypatch.setattr(train, "train_classical_fold", timed)
    clock.per_fold = 10.0
    return clock


def speed(train_rows_per_s: float) -> EncoderSpeed:
    return EncoderSpeed(train_rows_per_s, 3 * train_rows_per_s, np.full(50, 40))


def run_auto(cfg, clock, limit: str) -> int:
    args = SimpleNamespace(config=str(cfg), set=[], params=None, quiet=True, time_limit=limit)
    from comp.errors import run_cli
    return run_cli(lambda: auto.Auto(args, auto.cli.console(True), clock).plan())


def summary(cfg) -> dict:
    return json.loads((cfg.parent / "reports" / "auto.json").read_text())


def test_a_slow_encoder_is_skipped_and_the_classical_runs_make_the_submission(tmp_path, tiny_model, clocked,
                                                                            monkeypatch):
    cfg = write_project(tmp_path, tiny_model)
    monkeypatch.setattr(auto, "encoder_speed", lambda *a: speed(0.01))  # 60 rows need hours
    assert run_auto(cfg, clocked, "10m") == 0
    members = summary(cfg)["members"]
    assert members["linear"]["status"] == members["gbm"]["status"] == "trained"
    assert members["encoder"]["status"] == "skipped" and "max_length 48 and 1 epoch need" in members["encoder"]["reason"]
    submission = pd.read_csv(tmp_path / "submissions" / "auto.csv")
    assert len(submission) == len(pd.read_csv(tmp_path / "data" / "test.csv"))
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    assert summary(cfg)["ensemble"]["cv"] is not None


def test_the_encoder_is_sized_to_what_is_left(tmp_path, tiny_model, clocked, monkeypatch):
    cfg = write_project(tmp_path, tiny_model)
    # 60 training rows a fold at 1 row/s: an epoch at max_length 48 about 60 s, 3 folds of 2 epochs ~ 7 min
    monkeypatch.setattr(auto, "encoder_speed", lambda *a: speed(1.0))
    clocked.per_fold = 60.0  # the classical runs take 6 of the 13 minutes; 2 epochs need 7.5, 1 epoch 4
    assert run_auto(cfg, clocked, "13m") == 0
    members = summary(cfg)["members"]
    assert members["encoder"]["status"] == "trained", members["encoder"]
    assert "train.epochs=1" in members["encoder"]["settings"]  # 2 epochs would not fit; 1 does
    record = json.loads((tmp_path / "folds" / "encoder" / "fold_0" / "metrics.json").read_text())
    assert len(record["history"]) == 1


def test_a_budget_spent_mid_run_stops_at_a_fold_boundary_and_a_rerun_continues(tmp_path, tiny_model, clocked,
                                                                               monkeypatch):
    cfg = write_project(tmp_path, tiny_model)
    monkeypatch.setattr(auto, "encoder_speed", lambda *a: speed(0.01))
    clocked.per_fold = 100.0  # the linear run expects seconds a fold; each takes 100 of a 3-minute budget
    assert run_auto(cfg, clocked, "3m") == 2  # no run finished: nothing to blend
    linear = [load(cfg, ["run.name=linear"]).fold_dir(k) / "metrics.json" for k in range(3)]
    assert [p.is_file() for p in linear] == [True, True, False]
    assert not (tmp_path / "submissions" / "auto.csv").exists()
    clocked.now = 0.0
    clocked.per_fold = 1.0
    assert run_auto(cfg, clocked, "10m") == 0
    assert all(p.is_file() for p in linear)
    assert summary(cfg)["members"]["linear"]["status"] == "trained"


def test_the_encoders_speed_is_measured_on_the_competitions_rows(tmp_path, tiny_model):
    from comp.cli import console
    from comp.outputs.costs import encoder_speed
    from comp.tables.read import load_competition

    cfg = load(write_project(tmp_path, tiny_model))
    comp = load_competition(cfg)
    measured = encoder_speed(cfg, comp, runs.tokenize_tables(cfg, comp, console(True)), rows=32)
    assert measured.train > 0 and measured.predict > 0 and len(measured.lengths) == 32
    assert measured.lengths.max() <= cfg.model.max_length


def test_the_plan_takes_the_most_work_that_fits():
    cfg = load_config_with(max_length=256, epochs=3)
    fast = EncoderSpeed(10.0, 30.0, np.array([50, 100, 300, 400]))  # mean 212 tokens at 256, 128 at 128
    sizes = (800, 200, 500)
    seconds = {(n, e): cfg.folds.n_splits * fast.fold_seconds(n, e, *sizes) for n in (64, 128, 256) for e in (1, 2, 3)}
    assert auto.encoder_plan(fast, cfg, sizes, seconds[256, 3]) == (256, 3)
    assert auto.encoder_plan(fast, cfg, sizes, seconds[256, 3] - 1) == (256, 2)  # 512 tokens·epochs over 384
    assert auto.encoder_plan(fast, cfg, sizes, seconds[64, 1] - 1) is None
    assert seconds[128, 1] < seconds[256, 1]  # shorter windows cost less


def load_config_with(max_length: int, epochs: int):
    from comp.config import Config
    return Config().replace("model", max_length=max_length).replace("train", epochs=epochs)
