"""Optuna tuning on the tiny model: pruning, best params handed to train, workers sharing a study, resume."""

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import TrialState

from comp import config, folds, train, tune
from comp.tables import read as tables
from comp.tables import splits
from tests.conftest import assert_user_error, make_tables, snapshot, write_project

ROOT = Path(__file__).resolve().parents[1]


def storage_url(cfg_path: Path) -> str:
    return f"sqlite:///{(cfg_path.parent / 'folds' / 'tune.db').resolve()}"


def load(cfg_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=storage_url(cfg_path))


def test_space_key_naming_no_field_is_one_line(project, capsys):
    with open(project, "a") as fh:
        fh.write('\n[tune.space]\n"train.encoder_lrr" = {type = "float", low = 1e-5, high = 1e-3}\n')
    before = snapshot(project.parent)
    assert_user_error(tune.main(["--config", str(project)]), capsys, "train.encoder_lrr", "names no config field")
    assert snapshot(project.parent) == before


def test_space_entries_are_validated(tmp_path):
    for entry, needle in [('{type = "float", low = 1.0}', "low <= high"), ('{type = "normal"}', "type"),
                          ('{type = "categorical", choices = []}', "choices"), ('{type = "int", low = 1, high = 2, q = 1}',
                                                                               "unknown entry")]:
        path = tmp_path / "c.toml"
        path.write_text(f'[tune.space]\n"train.batch_size" = {entry}\n')
        with pytest.raises(Exception, match=needle):
            config.load(path)


def test_study_prunes_absurd_lr_writes_best_params_and_train_applies_them(project, capsys):
    over = ["--set", "tune.pruner_startup_trials=2", "--set", "train.epochs=2"]
    assert folds.main(["--config", str(project)]) == 0
    assert tune.main(["--config", str(project), *over, "--n-trials", "3"]) == 0
    study = load(project)
    study.enqueue_trial({"train.encoder_lr": 50.0, "train.head_lr": 50.0, "model.dropout": 0.0})
    capsys.readouterr()
    assert tune.main(["--config", str(project), *over, "--n-trials", "4"]) == 0  # continues the same study
    out = capsys.readouterr().out
    study = load(project)
    assert len(study.trials) == 4 and "top trials" in out and "pruning saved" in out
    absurd = [t for t in study.trials if t.params["train.encoder_lr"] == 50.0]
    assert len(absurd) == 1 and absurd[0].state == TrialState.PRUNED
    assert absurd[0].user_attrs["epochs_run"] < 2

    best_file = project.parent / "folds" / "best_params.toml"
    best = study.best_trial.params
    text = best_file.read_text()
    assert "[train]" in text and "[model]" in text
    for name in ("tiny_history.png", "tiny_importances.png"):
        png = (project.parent / "folds" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    assert train.main(["--config", str(project), "--fold", "0", "--params", str(best_file), "--set", "train.epochs=1"]) == 0
    assert "applied tuned params: train.encoder_lr=" in capsys.readouterr().out
    used = config.load(project.parent / "folds" / "tiny" / "fold_0" / "config.toml")
    assert used.train.encoder_lr == best["train.encoder_lr"] and used.model.dropout == best["model.dropout"]
    assert used.train.epochs == 1  # --set beats the params file


def start_worker(cfg_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "comp.tune", "--config", str(cfg_path), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_share_one_study(tmp_path, tiny_model, backend, request):
    # trials long enough (about 2 s) that neither worker can finish the study before the other has started
    project = write_project(tmp_path, tiny_model, make_tables(n_train=300, n_test=6))
    url = storage_url(project) if backend == "sqlite" else request.getfixturevalue("postgres_url")
    assert folds.main(["--config", str(project)]) == 0
    workers = [start_worker(project, "--n-trials", "6", "--worker-id", str(i), "--storage", url, "--set",
                            "train.epochs=2", "--set", "train.batch_size=8", "--set", "tune.pruner=none")
               for i in range(2)]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = [t for t in optuna.load_study(study_name="tiny", storage=url).trials if t.state in tune.FINISHED]
    # each worker stops once the study holds 6 finished trials; the other may finish the one it was running
    assert 6 <= len(trials) <= 7
    assert len({t.number for t in trials}) == len(trials)
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}
    if backend == "postgresql":  # the trials live in the server's tables, not in a file beside the project
        assert not (project.parent / "folds" / "tune.db").exists()


def test_killed_worker_trial_is_failed_and_retried(tmp_path, tiny_model):
    cfg = write_project(tmp_path, tiny_model, make_tables(n_train=300, n_test=6))
    over = ["--set", "tune.heartbeat_interval=1", "--set", "tune.grace_period=2", "--set", "train.batch_size=4",
            "--set", "train.epochs=3", "--set", "tune.pruner=none"]
    assert folds.main(["--config", str(cfg)]) == 0
    worker = start_worker(cfg, "--n-trials", "2", *over)
    db = cfg.parent / "folds" / "tune.db"
    deadline = time.monotonic() + 120
    running = []
    while not running and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        if db.exists():
            try:
                # mid-trial: running, with its values already drawn (so the retry must reuse them)
                running = [t for t in load(cfg).get_trials(states=(TrialState.RUNNING,)) if t.params]
            except Exception:  # noqa: BLE001 - the study may not exist yet
                running = []
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert worker.returncode == -signal.SIGKILL and running, "the worker finished before it could be killed"
    time.sleep(3)  # past the grace period: the orphaned trial's heartbeat is stale
    rerun = start_worker(cfg, "--n-trials", "2", *over)
    out = rerun.communicate(timeout=240)[0]
    assert rerun.returncode == 0, out
    trials = load(cfg).trials
    orphan = trials[running[0].number]
    assert orphan.state == TrialState.FAIL
    retried = [t for t in trials if RetryFailedTrialCallback.retried_trial_number(t) == orphan.number]
    assert len(retried) == 1 and retried[0].params == orphan.params
    assert sum(t.state in tune.FINISHED for t in trials) == 2


def test_trials_release_memory(project):
    assert folds.main(["--config", str(project)]) == 0
    cfg = config.load(project, ["train.epochs=1"])
    comp = tables.load_competition(cfg)
    f, _ = splits.load_folds(cfg, comp)
    from rich.console import Console

    objective = tune.Objective(cfg, comp, f, Console(quiet=True))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    live = []
    for _ in range(5):
        study.optimize(objective, n_trials=1)
        gc.collect()
        live.append(sum(isinstance(o, torch.Tensor) for o in gc.get_objects()))
    assert max(live[1:]) <= live[0], live  # no tensors kept alive trial over trial
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    json.dumps(live)


def test_a_trial_trains_on_tokens_of_its_own_max_length(project, monkeypatch):
    """model.max_length in [tune.space] must change what the trial's model reads (tokens follow the trial's
    config through the cache), not only the config it records."""
    assert folds.main(["--config", str(project)]) == 0
    cfg = config.load(project, ["train.epochs=1", "tune.folds=[0]"])
    cfg = cfg.replace("tune", space={"model.max_length": {"type": "categorical", "choices": [8, 48]}})
    comp = tables.load_competition(cfg)
    f, _ = splits.load_folds(cfg, comp)
    seen = []
    real = tune.fit_split

    def spy(trial_cfg, comp, part, index, tokens, *args, **kwargs):
        seen.append((trial_cfg.model.max_length, max(len(t) for t in tokens.train)))
        return real(trial_cfg, comp, part, index, tokens, *args, **kwargs)

    monkeypatch.setattr(tune, "fit_split", spy)
    from rich.console import Console

    objective = tune.Objective(cfg, comp, f, Console(quiet=True))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for length in (8, 48):
        study.enqueue_trial({"model.max_length": length})
    study.optimize(objective, n_trials=2)
    assert sorted(seen) == [(8, 8), (48, max(n for m, n in seen if m == 48))] and seen[0][1] != seen[1][1]


@pytest.mark.parametrize("kind, keys", [("linear", {"model.tfidf.C", "model.tfidf.word_ngrams"}),
                                        ("gbm", {"model.gbm.num_leaves", "model.gbm.learning_rate"})])
def test_a_classical_run_is_tuned_over_its_own_space_and_train_applies_the_best(project, kind, keys):
    sets = ["--set", f"model.kind={kind}", "--set", f"run.name={kind}", "--set", "tune.pruner=none", "--quiet"]
    assert set(config.load(project, [f"model.kind={kind}"]).tune.space) >= keys  # the kind's default space
    if kind == "gbm":  # 60 fixture rows: leaves of a few rows, or no split at all
        with open(project, "a") as fh:
            fh.write('\n[tune.space]\n"model.gbm.min_child_samples" = {type = "int", low = 2, high = 5}\n')
    assert folds.main(["--config", str(project)]) == 0
    assert tune.main(["--config", str(project), *sets, "--n-trials", "3"]) == 0
    study = optuna.load_study(study_name=kind, storage=storage_url(project))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3 and keys <= set(done[0].params) and len({t.value for t in done}) > 1
    best = project.parent / "folds" / "best_params.toml"
    applied = config.load(project, [f"model.kind={kind}"], params=best)
    for key, value in study.best_trial.params.items():
        value = tune.decoded(value)
        section, *path = key.split(".")
        got = getattr(applied, section)
        for name in path:
            got = getattr(got, name)
        assert list(got) == value if isinstance(value, list) else got == value, key
    assert train.main(["--config", str(project), "--all", "--params", str(best), *sets]) == 0


def test_a_classical_space_naming_an_encoder_key_is_one_line(project, capsys):
    with open(project, "a") as fh:
        fh.write('\n[tune.space]\n"train.encoder_lr" = {type = "float", low = 1e-5, high = 1e-3}\n')
    assert folds.main(["--config", str(project), "--quiet"]) == 0
    before = snapshot(project.parent)
    assert_user_error(tune.main(["--config", str(project), "--set", "model.kind=gbm"]), capsys,
                      "'train.encoder_lr' changes nothing a gbm run learns")
    assert snapshot(project.parent) == before
