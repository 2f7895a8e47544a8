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
