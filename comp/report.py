"""`python -m comp.report`: the plots and tables of a run on one static page; `--runs`: every submit so far."""

from __future__ import annotations

import html
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from comp import adversarial, cli, metrics
from comp.artifacts import atomic_path, read_json, write_text
from comp.config import Config
from comp.errors import CompError, run_cli
from comp.outputs.collect import (
    FoldOutputs,
    average_probabilities,
    fold_scores,
    leaderboard,
    load_run,
    test_logits_in_order,
)

RUN_COLUMNS = ["time", "run", "model", "config_hash", "folds_fingerprint", "task", "metric", "cv", "lb", "scores",
               "submission"]


def report_dir(cfg: Config) -> Path:
    return cfg.path(cfg.run.reports_dir) / cfg.run.name


def runs_path(cfg: Config) -> Path:
    return cfg.path(cfg.run.submissions_dir) / "runs.csv"


def append_run(cfg: Config, cv: dict, lb: dict | None, folds_fp: str, model: str | None = None,
               config_hash: str | None = None) -> None:
    """Add one row for this submit (or blend) to submissions/runs.csv (rewritten atomically): the competition's
    metric on the CV and the leaderboard, and every score as JSON."""
    path = runs_path(cfg)
    old = _upgrade(pd.read_csv(path)) if path.is_file() else pd.DataFrame(columns=RUN_COLUMNS)
    metric = cfg.data.metric
    row = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "run": cfg.run.name, "model": model or cfg.model.name_or_path,
           "config_hash": config_hash or cfg.hash(), "folds_fingerprint": folds_fp, "task": cfg.data.task,
           "metric": metric, "cv": cv[metric], "lb": lb[metric] if lb else None,
           "scores": json.dumps({"cv": cv, "leaderboard": lb}), "submission": str(cfg.submission_path)}
    table = pd.concat([old, pd.DataFrame([row])], ignore_index=True) if len(old) else pd.DataFrame([row])
    with atomic_path(path) as tmp:
        table[RUN_COLUMNS].to_csv(tmp, index=False)


def _upgrade(runs: pd.DataFrame) -> pd.DataFrame:
    """A runs.csv from before the metric columns: its rows were single_label runs scored by macro-F1."""
    if "metric" in runs.columns:
        return runs
    return runs.assign(task=metrics.SINGLE, metric="macro_f1", cv=runs["cv_macro_f1"], lb=runs["lb_macro_f1"],
                       scores=None)


def print_runs(cfg: Config, console: Console) -> None:
    """Every recorded submit, grouped by metric, best CV first, with the CV - leaderboard gap."""
    path = runs_path(cfg)
    if not path.is_file():
        raise CompError(f"{path} not found: it is written by python -m comp.submit")
    runs = _upgrade(pd.read_csv(path))
    runs["rank"] = [-v if metrics.DIRECTION[m] == "max" else v for m, v in zip(runs["metric"], runs["cv"], strict=True)]
    runs = runs.sort_values(["metric", "rank"])
    table = Table(title=f"{path}: {len(runs)} submit(s), best CV first")
    for col in ("time", "run", "model", "config", "metric", "CV", "LB", "CV - LB"):
        table.add_column(col, justify="right")
    for _, r in runs.iterrows():
        lb = r["lb"]
        has_lb = pd.notna(lb)
        table.add_row(str(r["time"]), str(r["run"]), str(r["model"]).split("/")[-1], str(r["config_hash"])[:8],
                      str(r["metric"]), f"{r['cv']:.4f}", f"{lb:.4f}" if has_lb else "",
                      f"{r['cv'] - lb:+.4f}" if has_lb else "")
    console.print(table)


# --- plots -------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _pyplot().close(fig)


def plot_learning_curves(records: list[dict], monitor: str, metric: str, path: Path) -> None:
    """Per fold: train and validation loss, and the monitored metric, per epoch; the best epoch marked."""
    plt = _pyplot()
    n = len(records)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 3.4), squeeze=False)
    for ax, rec in zip(axes[0], records, strict=True):
        hist = rec["history"]
        epochs = [h["epoch"] for h in hist]
        ax.plot(epochs, [h["train_loss"] for h in hist], "o-", label="train loss")
        ax.plot(epochs, [h["val_loss"] for h in hist], "o-", label="val loss")
        ax.axvline(rec["best_epoch"], color="grey", linestyle=":", label=f"best epoch {rec['best_epoch']}")
        ax.set_title(f"fold {rec['fold']}")
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        twin = ax.twinx()
        twin.plot(epochs, [h.get(f"val_{metric}", np.nan) for h in hist], "s--", color="tab:green",
                  label=f"val {metric}")
        if rec is records[-1]:
            lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
            labels = ax.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
            ax.legend(lines, labels, fontsize=7, loc="upper right")
    fig.suptitle(f"learning curves (early stopping on {monitor})", fontsize=10)
    _save(fig, path)


def plot_confusion(y: np.ndarray, pred: np.ndarray, classes: list[str], path: Path) -> np.ndarray:
    """The OOF confusion matrix, normalised per true class, with the counts written in; returns the counts."""
    plt = _pyplot()
    counts = confusion_matrix(y, pred, labels=np.arange(len(classes)))
    norm = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = 1.2 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{norm[i, j]:.2f}\n({counts[i, j]})", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("OOF confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)
    return counts


def per_class_table(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support of each class over the OOF predictions."""
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=np.arange(len(classes)), zero_division=0)
    return pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f, "support": s})


def plot_per_class(table: pd.DataFrame, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(table), 3.4))
    x = np.arange(len(table))
    for k, col in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (k - 1) * 0.27, table[col], width=0.27, label=col)
    ax.set_xticks(x, [f"{c}\n(n={n})" for c, n in zip(table["class"], table["support"], strict=True)])
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("per-class precision / recall / F1 (OOF)")
    _save(fig, path)


def plot_confidence(y: np.ndarray, probs: np.ndarray, path: Path) -> None:
    """Distribution of the OOF max-probability for correct and wrong predictions."""
    plt = _pyplot()
    top = probs.max(1)
    right = probs.argmax(1) == y
    fig, ax = plt.subplots(figsize=(6, 3.4))
    bins = np.linspace(1 / probs.shape[1], 1, 21)
    ax.hist(top[right], bins=bins, alpha=0.6, label=f"correct ({right.sum()})", density=True)
    ax.hist(top[~right], bins=bins, alpha=0.6, label=f"wrong ({(~right).sum()})", density=True)
    ax.set_xlabel("OOF max probability")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title("confidence of correct vs wrong OOF predictions")
    _save(fig, path)


# --- the page ----------------------------------------------------------------------------------------

def write_report(cfg: Config, outputs: list[FoldOutputs], per_fold: list[dict], y: np.ndarray, oof: np.ndarray,
                 classes: list[str], cv: dict, lb: dict | None) -> Path:
    """PNGs and index.html for a run under reports/<run>/; returns the page's path. The confusion matrix, the
    per-class and the confidence plots are single_label's; the other tasks get a table per label / target."""
    out = report_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    task, metric = cfg.data.task, cfg.data.metric
    plot_learning_curves([o.record for o in outputs], cfg.train.monitor, metric, out / "learning_curves.png")
    images = ["learning_curves.png"]
    counts = None
    if task == metrics.SINGLE:
        pred = oof.argmax(1)
        counts = plot_confusion(y, pred, classes, out / "confusion_matrix.png")
        per_class = per_class_table(y, pred, classes)
        plot_per_class(per_class, out / "per_class.png")
        plot_confidence(y, metrics.probabilities(oof), out / "confidence.png")
        images += ["confusion_matrix.png", "per_class.png", "confidence.png"]
    else:
        predictions = metrics.activate(task, oof)
        per_class = pd.DataFrame([{"label" if task == metrics.MULTI else "target": name,
                                   **metrics.score_predictions(y[:, [j]], predictions[:, [j]], task)}
                                  for j, name in enumerate(classes)])
    study = cfg.tune.study_name or cfg.run.name
    for suffix in ("history", "importances"):
        src = cfg.folds_path.parent / f"{study}_{suffix}.png"
        if src.is_file():
            shutil.copyfile(src, out / f"tune_{suffix}.png")
            images.append(f"tune_{suffix}.png")
    shown = metrics.columns(task, metric)
    fold_rows = [[o.fold, o.record["best_epoch"], *(scores[k] for k in shown)]
                 for o, scores in zip(outputs, per_fold, strict=True)]
    folds_df = pd.DataFrame(fold_rows, columns=["fold", "best epoch", *shown])
    summary = pd.DataFrame([{"": "CV (all OOF)", **cv}] + ([{"": "leaderboard", **lb}] if lb else []))
    page = _html(cfg, summary, folds_df, per_class, counts, classes, images, _adversarial_section(cfg))
    write_text(out / "index.html", page)
    return out / "index.html"


def _adversarial_section(cfg: Config) -> str:
    """comp.adversarial's result, when it has been run on these tables."""
    path = adversarial.record_path(cfg)
    if not path.is_file():
        return ""
    record = read_json(path)
    top = pd.DataFrame(record["top_features"]).to_html(index=False, float_format=lambda v: f"{v:+.3f}", border=0,
                                                        classes="t")
    return (f"<h2>adversarial validation (train vs test)</h2><p>ROC AUC {record['auc']:.3f} over {record['n_train']} "
            f"training and {record['n_test']} test rows: {html.escape(adversarial.verdict(record['auc']))}</p>{top}")


def _html(cfg, summary, folds_df, per_class, counts, classes, images, extra: str = "") -> str:
    def table(df: pd.DataFrame) -> str:
        return df.to_html(index=False, float_format=lambda v: f"{v:.4f}", border=0, classes="t")

    cm = "" if counts is None else "<h2>OOF confusion matrix (counts)</h2>" + pd.DataFrame(
        counts, index=[f"true {c}" for c in classes], columns=[f"pred {c}" for c in classes]).to_html(border=0, classes="t")
    imgs = "\n".join(f'<figure><img src="{html.escape(i)}" alt="{html.escape(i)}"><figcaption>{html.escape(i)}'
                     "</figcaption></figure>" for i in images)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>comp report: {html.escape(cfg.run.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}} table.t{{border-collapse:collapse;margin:0.5em 0 1.5em}}
table.t td,table.t th{{padding:3px 10px;text-align:right;border-bottom:1px solid #ddd}}
figure{{display:inline-block;margin:0 1em 1em 0}} img{{max-width:100%;border:1px solid #eee}}</style></head>
<body><h1>run {html.escape(cfg.run.name)}</h1>
<p>model {html.escape(cfg.model.name_or_path)} · config {cfg.hash()} · {len(folds_df)} folds ·
generated {time.strftime("%Y-%m-%d %H:%M:%S")}</p>
<h2>scores</h2>{table(summary)}
<h2>folds</h2>{table(folds_df)}
<h2>per {"class" if counts is not None else "label / target"} (OOF)</h2>{table(per_class)}
{cm}
{extra}
<h2>plots</h2>{imgs}
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    """Write reports/<run>/index.html with the run's tables and plots, or (--runs) list every submit."""
    parser = cli.parser("comp.report", main.__doc__)
    parser.add_argument("--runs", action="store_true", help="print submissions/runs.csv, best CV first")
    args = parser.parse_args(argv)

    def body() -> int:
        console = cli.console(args.quiet)
        cfg = cli.load_config(args, console)
        if args.runs:
            print_runs(cfg, console)
            return 0
        started = time.perf_counter()
        comp, folds, _, outputs, oof = load_run(cfg)
        cv = metrics.score(comp.y, oof, cfg.data.task)
        lb = None
        if cfg.data.solution:
            lb = leaderboard(cfg, comp, average_probabilities(test_logits_in_order(comp, outputs), cfg.data.task))
        page = write_report(cfg, outputs, fold_scores(cfg, comp, folds, outputs), comp.y, oof, comp.classes, cv, lb)
        console.print(f"wrote {page} and its plots in {time.perf_counter() - started:.1f}s")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
