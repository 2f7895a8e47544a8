"""Interruption and resume: a fold killed mid-epoch continues from its last checkpoint and ends as if never killed;
artifacts that were corrupted after writing are refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from comp import folds, submit, train
from comp.nn import state
from tests.conftest import assert_user_error, make_tables, snapshot, write_project

SLOW = ["--set", "train.epochs=3", "--set", "train.batch_size=4", "--set", "train.checkpoint_every=3",
        "--set", "train.patience=3", "--set", "train.log_every=1"]


def fold0(cfg: Path) -> Path:
    return cfg.parent / "folds" / "tiny" / "fold_0"


def reference_and_copy(tmp_path, tiny_model, name: str) -> tuple[Path, Path]:
    """Two projects on the same 300 rows with their folds made; fold 0 of the first trained uninterrupted."""
    tables = make_tables(n_train=300, n_test=12)
    reference = write_project(tmp_path / "reference", tiny_model, tables)
    other = write_project(tmp_path / name, tiny_model, tables)
    for cfg in (reference, other):
        assert folds.main(["--config", str(cfg)]) == 0
    assert train.main(["--config", str(reference), "--fold", "0", *SLOW]) == 0
    return reference, other


def test_killed_mid_epoch_resumes_and_matches_uninterrupted(tmp_path, tiny_model, monkeypatch):
    reference, killed = reference_and_copy(tmp_path, tiny_model, "killed")

    cmd = [sys.executable, "-m", "comp.train", "--config", str(killed), "--fold", "0", *SLOW]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = fold0(killed) / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert last.exists() and not (fold0(killed) / "metrics.json").exists()
    saved = torch.load(last, weights_only=True)
    assert saved["fit"]["step"] > 0  # killed in the middle of an epoch

    from comp.nn import engine
    fitted = []
    monkeypatch.setattr(engine, "fit_text_norm", lambda *a: fitted.append(a))
    assert train.main(["--config", str(killed), "--fold", "0", *SLOW]) == 0
    assert not fitted  # the checkpoint holds model.text_norm's map: not measured again
    record = json.loads((fold0(killed) / "metrics.json").read_text())
    assert record["resumed_from"] is not None and record["resumed_from"]["epoch"] >= 1
    assert not last.exists()  # dropped once the fold is finished
    expected = json.loads((fold0(reference) / "metrics.json").read_text())
    assert record["best_epoch"] == expected["best_epoch"]
    assert [h["train_loss"] for h in record["history"]] == pytest.approx([h["train_loss"] for h in expected["history"]])
    for name in ("oof_logits.npy", "test_logits.npy"):
        assert np.allclose(np.load(fold0(killed) / name), np.load(fold0(reference) / name), atol=1e-5)


def test_force_starts_over_instead_of_resuming(project, capsys):
    assert folds.main(["--config", str(project)]) == 0
    assert train.main(["--config", str(project), "--fold", "0", "--set", "train.epochs=1"]) == 0
    assert train.main(["--config", str(project), "--fold", "0", "--set", "train.epochs=1", "--force"]) == 0
    assert json.loads((fold0(project) / "metrics.json").read_text())["resumed_from"] is None


@pytest.fixture
def trained_fold_project(project):
    over = ["--set", "folds.n_splits=2", "--set", "train.epochs=1"]
    assert folds.main(["--config", str(project), *over]) == 0
    assert train.main(["--config", str(project), "--all", *over]) == 0
    return project, over


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_logits_refused_by_submit(trained_fold_project, capsys):
    project, over = trained_fold_project
    corrupt(fold0(project) / "oof_logits.npy")
    capsys.readouterr()
    before = snapshot(project.parent)
    assert_user_error(submit.main(["--config", str(project), *over]), capsys, "oof_logits.npy", "checksum", "--force")
    assert snapshot(project.parent) == before


def test_corrupted_encoder_refused_by_train(trained_fold_project, capsys):
    project, over = trained_fold_project
    (fold0(project) / "encoders.json").write_bytes(b"not what comp wrote")
    capsys.readouterr()
    before = snapshot(project.parent)
    assert_user_error(train.main(["--config", str(project), "--all", *over]), capsys, "encoders.json", "checksum")
    assert snapshot(project.parent) == before


def test_corrupted_checkpoint_refused(project, capsys):
    assert folds.main(["--config", str(project)]) == 0
    fold0(project).mkdir(parents=True)
    (fold0(project) / "last.pt").write_bytes(b"\x80\x04garbage")
    capsys.readouterr()
    assert_user_error(train.main(["--config", str(project), "--fold", "0"]), capsys, "last.pt", "unreadable", "--force")
    assert not (fold0(project) / "metrics.json").exists()


def test_folds_refuse_to_replace_a_split_trained_folds_depend_on(trained_fold_project, capsys):
    project, over = trained_fold_project
    folds_csv = project.parent / "folds" / "folds.csv"
    before = folds_csv.read_bytes()
    capsys.readouterr()
    code = folds.main(["--config", str(project), *over, "--set", "folds.seed=99"])
    assert_user_error(code, capsys, "trained fold", "--force")
    assert folds_csv.read_bytes() == before
    assert folds.main(["--config", str(project), *over]) == 0  # the same split again is fine
    assert folds.main(["--config", str(project), *over, "--set", "folds.seed=99", "--force"]) == 0
    assert folds_csv.read_bytes() != before


def test_a_time_limit_stops_at_a_checkpoint_and_a_rerun_ends_as_if_never_stopped(tmp_path, tiny_model, capsys,
                                                                                   monkeypatch):
    reference, stopped = reference_and_copy(tmp_path, tiny_model, "stopped")
    with monkeypatch.context() as m:  # the limit (an hour) counts as passed at the first checkpoint
        m.setattr(state, "time", SimpleNamespace(monotonic=lambda: float("inf")))
        code = train.main(["--config", str(stopped), "--all", "--time-limit", "1h", *SLOW])
    err = capsys.readouterr().err
    assert code == 3 and "time limit was reached: fold_0 stopped at its checkpoint (epoch 1, step 3)" in err, err
    assert (fold0(stopped) / "last.pt").exists() and not (fold0(stopped) / "metrics.json").exists()
    assert not (stopped.parent / "folds" / "tiny" / "fold_1").exists()  # no later fold was started
    assert train.main(["--config", str(stopped), "--fold", "0", *SLOW]) == 0
    record = json.loads((fold0(stopped) / "metrics.json").read_text())
    assert record["resumed_from"]["step"] == 3
    assert np.allclose(np.load(fold0(stopped) / "oof_logits.npy"), np.load(fold0(reference) / "oof_logits.npy"),
                       atol=1e-5)


def test_a_time_limit_past_before_a_fold_stops_before_it(project, capsys):
    assert folds.main(["--config", str(project), "--set", "folds.n_splits=2"]) == 0
    over = ["--set", "folds.n_splits=2", "--set", "model.kind=linear", "--set", "run.name=lin"]
    assert train.main(["--config", str(project), "--fold", "0", *over]) == 0
    capsys.readouterr()
    code = train.main(["--config", str(project), "--all", "--time-limit", "0.001s", *over])
    assert code == 3 and "before fold 1 of run 'lin'" in capsys.readouterr().err
    assert not (project.parent / "folds" / "lin" / "fold_1" / "metrics.json").exists()
