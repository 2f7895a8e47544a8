"""Folds in parallel as separate CPU processes give the same artifacts as folds in turn."""

import numpy as np

from comp import folds, train
from comp.outputs import collect as outputs
from tests.conftest import make_tables, write_project


def test_two_cpu_jobs_match_sequential_layout(tmp_path, tiny_model, capsys):
    tables = make_tables()
    parallel = write_project(tmp_path / "parallel", tiny_model, tables)
    sequential = write_project(tmp_path / "sequential", tiny_model, tables)
    for cfg in (parallel, sequential):
        assert folds.main(["--config", str(cfg)]) == 0
    assert train.main(["--config", str(sequential), "--all"]) == 0
    capsys.readouterr()
    assert train.main(["--config", str(parallel), "--all", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("started on cpu job") == 3 and out.count(" done on cpu job") == 3
    for k in range(3):
        a, b = parallel.parent / "folds" / "tiny" / f"fold_{k}", sequential.parent / "folds" / "tiny" / f"fold_{k}"
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir()) == sorted(outputs.FILES)
        assert np.allclose(np.load(a / "oof_logits.npy"), np.load(b / "oof_logits.npy"), atol=1e-4)
    assert train.main(["--config", str(parallel), "--all", "--jobs", "2"]) == 0  # finished folds are skipped
    assert "already trained" in capsys.readouterr().out


def test_failed_fold_process_is_reported(tmp_path, tiny_model, capsys):
    cfg = write_project(tmp_path, tiny_model)
    assert folds.main(["--config", str(cfg)]) == 0
    code = train.main(["--config", str(cfg), "--all", "--jobs", "2", "--set", "model.max_length=4096"])
    err = capsys.readouterr()
    assert code == 2 and "failed" in err.err and "model.max_length" in err.out


def test_cpu_jobs_split_the_cores_this_process_may_use(monkeypatch):
    from comp.nn import parallel
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0}, raising=False)  # taskset -c 0
    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 16)
    assert [s.env["OMP_NUM_THREADS"] for s in parallel.make_slots(None, 1)] == ["1"]
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert [s.env["OMP_NUM_THREADS"] for s in parallel.make_slots(None, 2)] == ["4", "4"]
