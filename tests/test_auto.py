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
    return EncoderSpeed(40 * train_rows_per_s, 120 * train_rows_per_s, np.full(50, 40), 32, 16, 8)  # 40 tokens a row


def run_auto(cfg, clock, limit: str) -> int:
    args = SimpleNamespace(config=str(cfg), set=[], params=None, quiet=True, time_limit=limit)
    from comp.errors import run_cli
    return run_cli(lambda: auto.Auto(args, auto.cli.console(True), clock).plan())


def summary(cfg) -> dict:
    return json.loads((cfg.parent / "reports" / "auto.json").read_text())


def test_a_slow_encoder_is_skipped_and_the_classical_runs_make_the_submission(tmp_path, tiny_model, clocked,
                                                                            monkeypatch):
    cfg = write_project(tmp_path, tiny_model)
    monkeypatch.setattr(auto, "encoder_speed", lambda *a, **k: speed(0.01))  # 60 rows need hours
    assert run_auto(cfg, clocked, "10m") == 0
    members = summary(cfg)["members"]
    assert members["linear"]["status"] == members["gbm"]["status"] == "trained"
    assert members["encoder"]["status"] == "skipped" and "max_length 48, 1 epoch and" in members["encoder"]["reason"]
    assert members["llm"]["status"] == "skipped" and "CUDA GPU" in members["llm"]["reason"]  # this CPU machine
    submission = pd.read_csv(tmp_path / "submissions" / "auto.csv")
    assert len(submission) == len(pd.read_csv(tmp_path / "data" / "test.csv"))
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    assert summary(cfg)["ensemble"]["cv"] is not None
    first = (tmp_path / "bundle" / "manifest.json").stat().st_ino
    assert run_auto(cfg, clocked, "10m") == 0  # a finished comp.auto reruns: its runs kept, its bundle replaced
    assert (tmp_path / "bundle" / "manifest.json").stat().st_ino != first


def test_the_encoder_is_sized_to_what_is_left(tmp_path, tiny_model, clocked, monkeypatch):
    cfg = write_project(tmp_path, tiny_model)
    # 60 training rows a fold at 1 row/s: an epoch at max_length 48 about 60 s, 3 folds of 2 epochs ~ 7 min
    monkeypatch.setattr(auto, "encoder_speed", lambda *a, **k: speed(1.0))
    clocked.per_fold = 60.0  # the classical runs take 6 of the 13 minutes; 2 epochs need 7.5, 1 epoch 4
    assert run_auto(cfg, clocked, "13m") == 0
    members = summary(cfg)["members"]
    assert members["encoder"]["status"] == "trained", members["encoder"]
    assert "train.epochs=1" in members["encoder"]["settings"]  # 2 epochs would not fit; 1 does
    record = json.loads((tmp_path / "folds" / "encoder" / "fold_0" / "metrics.json").read_text())
    assert len(record["history"]) == 1


def test_where_a_gpu_has_the_memory_an_llm_run_shares_the_encoders_budget(tmp_path, tiny_model, clocked,
                                                                          monkeypatch):
    cfg = write_project(tmp_path, tiny_model)
    monkeypatch.setattr(auto, "encoder_speed", lambda *a, **k: speed(1.0))
    monkeypatch.setattr(auto.Auto, "llm_absent", lambda self: "")  # as on a CUDA GPU with SmolLM2 installed
    planned, run = {}, auto.Auto.run

    def record(self, name, expected, sets, why):
        if name in ("encoder", "llm"):  # planned, not trained
            planned[name] = (expected, sets, self.left())
            self.clock.now += expected
            self.members[name] = {"status": "skipped", "reason": "planned"}
            return
        run(self, name, expected, sets, why)
    monkeypatch.setattr(auto.Auto, "run", record)
    assert run_auto(cfg, clocked, "18m") == 0  # 1 epoch fits in half of what is left, 2 in the rest
    (encoder, sets, left), (llm, llm_sets, llm_left) = planned["encoder"], planned["llm"]
    assert encoder <= auto.PLAN_SHARE * 0.5 * (left - auto.reserve(1080))  # half of what was left
    assert encoder < llm <= auto.PLAN_SHARE * (llm_left - auto.reserve(1080))  # the rest
    assert all(o in llm_sets for o in auto.LLM) and not any(o in sets for o in auto.LLM)


def test_a_budget_spent_mid_run_stops_at_a_fold_boundary_and_a_rerun_continues(tmp_path, tiny_model, clocked,
                                                                               monkeypatch):
    cfg = write_project(tmp_path, tiny_model)
    monkeypatch.setattr(auto, "encoder_speed", lambda *a, **k: speed(0.01))
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
    assert measured.train > 0 and measured.predict > 0 and len(measured.lengths) == len(comp.y)  # every row's length
    assert measured.lengths.max() <= cfg.model.max_length and measured.step >= 0
    windowed = encoder_speed(cfg, comp, runs.tokenize_tables(cfg, comp, console(True)), (8, 16), rows=32)
    assert set(windowed.windows) == {8, 16, cfg.model.max_length}  # each window a plan may choose
    assert windowed.windows[cfg.model.max_length] == (windowed.train, windowed.step)
    asked = []  # a window no plan could afford ends the measure: it and every longer one are left unmeasured
    cut = encoder_speed(cfg, comp, runs.tokenize_tables(cfg, comp, console(True)), (8, 16), rows=32,
                        worth=lambda s, length: asked.append((length, s.windows[length])) or length < 16)
    assert set(cut.windows) == {8} and asked == [(16, cut.windows[8])]  # asked at the last window's rate
    assert (cut.train, cut.step) == cut.windows[8]


def test_a_folds_padded_tokens_follow_its_batching_not_a_samples():
    lengths = np.random.default_rng(0).integers(10, 250, 4000)
    speed = EncoderSpeed(1000.0, 4000.0, lengths, 32, 16, 8)
    fold = speed.per_row(256, training=True)
    assert lengths.mean() <= fold < 1.1 * lengths.mean() + 8  # pools sorted by length: little padding
    assert speed.per_row(256, training=False) <= fold  # prediction sorts every row
    assert speed.per_row(64, training=True) < 72  # shorter windows cost less
    train, predict = speed.rows_per_second(256)
    assert train == pytest.approx(1000.0 / fold) and predict > train
    stepped = EncoderSpeed(1000.0, 4000.0, lengths, 32, 16, 8, step=0.5)  # half a second a step beyond its tokens
    assert 1 / stepped.rows_per_second(256)[0] == pytest.approx(1 / train + 0.5 / 32)
    assert stepped.rows_per_second(256)[1] == predict  # prediction has no optimizer step


def test_each_window_is_costed_at_the_speed_measured_there():
    from comp.outputs.costs import step_split
    lengths = np.full(256, 200)
    flat = EncoderSpeed(1000.0, 4000.0, lengths, 32, 16, 8)
    windows = EncoderSpeed(1000.0, 4000.0, lengths, 32, 16, 8, windows={64: (2000.0, 0.1), 256: (500.0, 0.2)})
    assert 1 / windows.rows_per_second(64)[0] == pytest.approx(0.1 / 32 + 64 / 2000)
    assert 1 / windows.rows_per_second(256)[0] == pytest.approx(0.2 / 32 + 200 / 500)
    assert windows.rows_per_second(128) == flat.rows_per_second(128)  # not measured there: train and step
    # epochs of (seconds, padded tokens, steps): 2 steps of 0.2 s plus 1 ms a token
    assert step_split((0.4 + 4.096, 4096, 2), (0.4 + 0.512, 512, 2)) == pytest.approx((1000.0, 0.2))


def test_the_plan_takes_the_most_work_that_fits():
    cfg = load_config_with(max_length=256, epochs=3)
    fast = EncoderSpeed(10.0, 30.0, np.array([50, 100, 300, 400]), 2, 2, 1)  # 178 padded tokens a row at 256, 114 at 128
    sizes = (800, 200, 500)
    seconds = {(n, e): cfg.folds.n_splits * fast.fold_seconds(n, e, *sizes) for n in (64, 128, 256) for e in (1, 2, 3)}
    assert auto.encoder_plan(fast, cfg, sizes, seconds[256, 3]) == (800, 256, 3)
    assert auto.encoder_plan(fast, cfg, sizes, seconds[256, 3] - 1) == (800, 256, 2)  # 2 × 178 tokens a row over 3 × 114
    assert auto.encoder_plan(fast, cfg, sizes, seconds[64, 1] - 1) is None  # 400 rows would be below MIN_ROWS
    assert seconds[128, 1] < seconds[256, 1]  # shorter windows cost less
    measured = EncoderSpeed(10.0, 30.0, fast.lengths, 2, 2, 1, windows={64: (10.0, 0.0), 128: (10.0, 0.0)})
    assert auto.encoder_plan(measured, cfg, sizes, seconds[256, 3]) == (800, 128, 3)  # 256 was not measured


def test_the_plan_trains_on_fewer_rows_before_it_skips_the_encoder():
    cfg = load_config_with(max_length=256, epochs=3)
    fast = EncoderSpeed(10.0, 30.0, np.array([50, 100, 300, 400]), 2, 2, 1)
    sizes = (4000, 1000, 500)
    cost = {rows: cfg.folds.n_splits * fast.fold_seconds(64, 1, rows, *sizes[1:]) for rows in (4000, 2000, 1000)}
    assert auto.row_counts(4000) == [4000, 2000, 1000]
    assert auto.encoder_plan(fast, cfg, sizes, cost[4000] - 1)[0] == 2000  # all rows no longer fit: half of them
    assert auto.encoder_plan(fast, cfg, sizes, cost[2000] - 1)[0] == 1000
    assert auto.encoder_plan(fast, cfg, sizes, cost[1000] - 1) is None


def load_config_with(max_length: int, epochs: int):
    from comp.config import Config
    return Config().replace("model", max_length=max_length).replace("train", epochs=epochs)


def test_train_max_rows_trains_each_fold_on_a_stratified_sample_of_its_rows(tmp_path, tiny_model, capsys):
    from comp import config, folds
    from comp.tables.read import load_competition
    from comp.tables.splits import load_folds
    from tests.conftest import assert_user_error, make_tables

    path = write_project(tmp_path, tiny_model, make_tables(n_train=60, n_test=12))
    assert folds.main(["--config", str(path), "--quiet"]) == 0
    cfg = config.load(path, ["train.max_rows=20"])
    comp = load_competition(cfg)
    split, _ = load_folds(cfg, comp)
    tr = np.flatnonzero(split != 0)
    keep = runs.training_part(cfg, comp, tr, 0)
    assert len(keep) == 20 and set(comp.y[tr[keep]]) == set(comp.y[tr])  # every class is in the sample
    assert not np.array_equal(keep, runs.training_part(cfg, comp, tr, 1))  # each fold draws its own
    assert len(runs.training_part(config.load(path), comp, tr, 0)) == len(tr)  # 0: every row
    capsys.readouterr()
    assert train.main(["--config", str(path), "--fold", "0", "--set", "train.max_rows=20", "--set", "train.epochs=1"]) == 0
    assert "fold 0: 20 train rows" in capsys.readouterr().out
    record = json.loads((cfg.fold_dir(0) / "metrics.json").read_text())
    assert record["n_train"] == 20 and record["n_val"] == (split == 0).sum()
    code = train.main(["--config", str(path), "--fold", "0", "--set", "train.max_rows=20", "--set", "model.kind=linear"])
    assert_user_error(code, capsys, "train.max_rows", "leave train.max_rows = 0")


def test_a_folds_fixed_costs_and_checkpoints_count_in_its_seconds():
    import dataclasses
    plain = EncoderSpeed(400.0, 1200.0, np.full(100, 40), 32, 16, 8)  # 10 training and 30 predicted rows/s
    costly = dataclasses.replace(plain, fixed=5.0, save=2.0)
    # 3 epochs of 100 rows: 30 s of training, so 3 epoch-end checkpoints and 3 more at every 10 s
    assert costly.fold_seconds(64, 3, 100, 30, 60, 10.0) == pytest.approx(plain.fold_seconds(64, 3, 100, 30, 60) + 5 + 6 * 2)
    assert auto.checkpoint_seconds(plain, 1200) == pytest.approx(24.0)  # the budget / CHECKPOINTS
    assert auto.checkpoint_seconds(costly, 1200) == pytest.approx(40.0)  # a save at most 5% of the training between
    assert auto.checkpoint_seconds(dataclasses.replace(plain, save=60.0), 1200) == pytest.approx(84.0)  # 7% at most


def test_the_auto_benchmarks_baseline_reads_the_text_on_comps_folds(tmp_path):
    from comp import bench_auto
    from tests.conftest import make_tables
    root = tmp_path / "fixture"
    root.mkdir()
    tables = make_tables(n_train=120, n_test=30)
    for name, table in tables.items():
        table.to_csv(root / name, index=False)
    assert bench_auto.prepare(tmp_path, "fixture", tmp_path / "cache", rows=90) == root  # comp.init, comp.folds
    assert (root / "comp.toml").is_file() and (root / "folds" / "folds.csv").is_file()
    scores = bench_auto.baseline(root, rows=90)
    assert scores["cv"] > 0.9 and scores["lb"] > 0.9  # the fixture's text carries the label
    shuffled = tables["train.csv"].assign(label=np.random.default_rng(0).permutation(tables["train.csv"]["label"]))
    shuffled.to_csv(root / "train.csv", index=False)
    (root / "folds" / "folds.csv").unlink()
    bench_auto.prepare(tmp_path, "fixture", tmp_path / "cache", rows=90)
    assert bench_auto.baseline(root, rows=90)["cv"] < 0.6  # no signal left: about chance (3 classes)


def test_the_auto_benchmark_merges_what_two_runs_beside_each_other_wrote(tmp_path):
    from comp import bench_auto
    from comp.artifacts import read_json
    out = tmp_path / "bench_auto.json"
    bench_auto.record(out, "birds@60m", {"baseline": {"cv": 0.3}, "autogluon": {"best_quality": {"lb": 0.5}}})
    bench_auto.record(out, "birds@60m", {"auto": {"rc": 0}, "baseline": {"cv": 0.3},
                                         "autogluon": {"medium_quality": {"lb": 0.4}}})
    assert read_json(out)["birds@60m"] == {"baseline": {"cv": 0.3}, "auto": {"rc": 0},
                                           "autogluon": {"best_quality": {"lb": 0.5}, "medium_quality": {"lb": 0.4}}}
