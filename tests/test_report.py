"""Reports: run logs, plots, the run record and the one-page report; console output fit for CI logs."""

import json
import struct

import pandas as pd
import pytest

from comp import config, report, submit, train
from comp.outputs import collect as outputs
from tests.conftest import own_copy, trained_project


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    return trained_project(tmp_path_factory.mktemp("report"), tiny_model)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])
    return len(data), width, height


def test_submit_writes_plots_page_and_one_run_row_per_submit(run, capsys):
    root = run.parent
    runs_csv = root / "submissions" / "runs.csv"
    rows_before = len(pd.read_csv(runs_csv)) if runs_csv.exists() else 0
    results = [submit.submit(config.load(run)) for _ in range(2)]
    table = pd.read_csv(runs_csv)
    assert len(table) == rows_before + 2
    for row, res in zip(table.tail(2).itertuples(), results, strict=True):
        assert row.metric == "macro_f1" and row.task == "single_label"
        assert row.cv == pytest.approx(res["cv"]["macro_f1"])
        assert row.lb == pytest.approx(res["leaderboard"]["macro_f1"])
        assert json.loads(row.scores)["cv"]["log_loss"] == pytest.approx(res["cv"]["log_loss"])
        assert row.run == "tiny" and row.config_hash == config.load(run).hash()
    out = root / "reports" / "tiny"
    for name in ("learning_curves.png", "confusion_matrix.png", "per_class.png", "confidence.png"):
        size, width, height = png_size(out / name)
        assert size > 8000 and width >= 300 and height >= 200, name
    page = (out / "index.html").read_text()
    for name in ("learning_curves.png", "confusion_matrix.png", "per_class.png", "confidence.png"):
        assert f'src="{name}"' in page
    assert "CV (all OOF)" in page and "leaderboard" in page


def test_confusion_matrix_counts_every_training_row_once(run, tmp_path):
    cfg = config.load(run)
    comp, f, _, outs, oof = outputs.load_run(cfg)
    counts = report.plot_confusion(comp.y, oof.argmax(1), comp.classes, tmp_path / "cm.png")
    assert counts.sum() == len(comp.train) == 90
    assert counts.sum(axis=1).tolist() == [int((comp.y == k).sum()) for k in range(3)]
    assert counts.trace() == int((oof.argmax(1) == comp.y).sum())
    table = report.per_class_table(comp.y, oof.argmax(1), comp.classes)
    assert table["support"].sum() == 90


def test_report_cli_and_runs_table(run, capsys):
    assert submit.main(["--config", str(run)]) == 0
    capsys.readouterr()
    assert report.main(["--config", str(run)]) == 0
    assert "index.html" in capsys.readouterr().out
    assert report.main(["--config", str(run), "--runs"]) == 0
    out = capsys.readouterr().out
    assert "best CV first" in out and "CV - LB" in out and "tiny" in out


def test_run_log_and_plain_output_outside_a_terminal(run, tmp_path, capsys):
    run = own_copy(run, tmp_path)
    capsys.readouterr()
    assert train.main(["--config", str(run), "--fold", "1", "--force"]) == 0
    out = capsys.readouterr().out
    assert "fold 1 epoch 1:" in out
    assert "\x1b" not in out and "\r" not in out  # no progress-bar control characters in logs
    log = (run.parent / "folds" / "tiny" / "fold_1" / "train.log").read_text()
    assert "fold 1 epoch 1:" in log and "fold 1 done" in log and "\x1b" not in log
    assert submit.main(["--config", str(run)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "CV macro_f1" in out


def test_quiet_prints_nothing(run, tmp_path, capsys):
    run = own_copy(run, tmp_path)
    capsys.readouterr()
    assert train.main(["--config", str(run), "--fold", "2", "--force", "--quiet"]) == 0
    assert submit.main(["--config", str(run), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert "fold 2 epoch 1:" in (run.parent / "folds" / "tiny" / "fold_2" / "train.log").read_text()


@pytest.mark.skipif(not __import__("shutil").which("chromium"), reason="Debian's chromium is not installed")
def test_page_renders_in_headless_chromium(run, tmp_path):
    import subprocess

    import matplotlib.image

    assert submit.main(["--config", str(run), "--quiet"]) == 0
    page = run.parent / "reports" / "tiny" / "index.html"
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000", f"--screenshot={shot}",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(shot)[..., :3]
    coloured = (abs(pixels - pixels.mean(axis=2, keepdims=True)).sum(axis=2) > 0.1).mean()
    assert coloured > 0.02  # the plots' colours are on screen, not just black text on white
