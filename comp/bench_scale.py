"""`python -m comp.bench_scale`: what each stage costs as a table grows. Tables of 20k, 200k and 1M rows are
built from the config's training table, every copy of a row with its text's words shuffled (distinct rows, a
real vocabulary); each stage runs in its own process as a user would run it, and its wall time and peak RSS go
to reports/scale.json."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from comp import cli
from comp.artifacts import write_json
from comp.errors import CompError, run_cli

SIZES = (20_000, 200_000, 1_000_000)
TEST_SHARE = 4  # the test table holds a quarter of the training rows, as Kaggle's often do
KINDS = ("linear", "gbm")


def shuffled(texts: pd.Series, rng: np.random.Generator) -> list[str]:
    """Each text with its words in a random order."""
    out = []
    for text in texts.fillna("").astype(str):
        words = text.split()
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


def build(cfg, rows: int, out: Path, seed: int = 0) -> Path:
    """train.csv (`rows` rows), test.csv (a quarter as many, no label), predict.csv (`rows` rows, no label) and a
    comp.toml under `out`, drawn with replacement from the config's training table; returns the config's path."""
    source = pd.read_csv(cfg.path(cfg.data.train))
    rng = np.random.default_rng(seed)
    tables = {"train": rows, "test": max(1, rows // TEST_SHARE), "predict": rows}
    out.mkdir(parents=True, exist_ok=True)
    for name, n in tables.items():
        table = source.iloc[rng.integers(0, len(source), n)].reset_index(drop=True)
        for column in cfg.data.text:
            table[column] = shuffled(table[column], rng)
        table[cfg.data.id] = [f"{name}-{i}" for i in range(n)]
        if name != "train":
            table = table.drop(columns=list(cfg.data.labels))
        table.to_csv(out / f"{name}.csv", index=False)
    d = cfg.data
    toml = (f'[data]\ntrain = "train.csv"\ntest = "test.csv"\nid = "{d.id}"\nlabel = "{d.labels[0]}"\n'
            f"text = {json.dumps(list(d.text))}\ntext_separator = {json.dumps(d.text_separator)}\n"
            f"categorical = {json.dumps(list(d.categorical))}\nnumeric = {json.dumps(list(d.numeric))}\n"
            f'train_rows = 0\nmetric = "{d.metric}"\n\n[folds]\nn_splits = 5\n\n'
            f'[model]\nname_or_path = "{cfg.model.name_or_path}"\nmax_length = {cfg.model.max_length}\n\n'
            f'[train]\nloss = "{cfg.train.loss}"\n')
    (out / "comp.toml").write_text(toml, encoding="utf-8")
    return out / "comp.toml"


def stages(config: Path) -> list[tuple[str, list[str]]]:
    """Each stage's name and the command (module, arguments) that runs it, in order."""
    c = ["--config", str(config)]
    kind = [[*c, "--set", f"run.name={k}", "--set", f"model.kind={k}"] for k in KINDS]
    return [("folds", ["comp.folds", *c]),
            *[(f"train {k} (5 folds)", ["comp.train", "--all", *a]) for k, a in zip(KINDS, kind, strict=True)],
            *[(f"submit {k}", ["comp.submit", *a]) for k, a in zip(KINDS, kind, strict=True)],
            ("blend --stack", ["comp.blend", *c, "--runs", ",".join(KINDS), "--stack", "--name", "stack"]),
            ("predict linear", ["comp.predict", *kind[0], "--test", str(config.parent / "predict.csv"),
                                "--out", str(config.parent / "predicted.csv")]),
            ("export linear", ["comp.export", *kind[0], "--out", str(config.parent / "bundle")]),
            ("tokenize (encoder)", ["comp.bench_scale", "--tokenize", *c])]


def measured(module: str, args: list[str], cwd: Path) -> dict:
    """Run `python -m module args` in its own process: wall seconds and peak RSS (GiB), or why it failed."""
    started = time.perf_counter()
    code = ("import resource, runpy, sys; sys.argv = [sys.argv[1]] + sys.argv[2:]\n"
            "try:\n    runpy.run_module(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n"
            "    code = e.code\nelse:\n    code = 0\n"
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, module, *args], cwd=cwd, capture_output=True, text=True)
    lines = done.stderr.splitlines()
    rss = [line.split()[1] for line in lines if line.startswith("RSS ")]
    result = {"seconds": round(time.perf_counter() - started, 1),
              "peak_rss_gib": round(int(rss[-1]) / 2 ** 20, 2) if rss else None, "rc": done.returncode}
    if done.returncode:
        said = [line for line in lines + done.stdout.splitlines() if line.strip() and not line.startswith("RSS ")]
        result["error"] = said[-1:]
    return result


def fold_seconds(folder: Path, run: str) -> list[float]:
    """The seconds each fold of a run took, as its metrics.json says."""
    out = []
    for path in sorted((folder / "folds" / run).glob("fold_*/metrics.json")):
        out.append(json.loads(path.read_text())["seconds"])
    return out


def plot(report: dict, path: Path) -> None:
    """Wall time and peak RSS of each stage against the training rows, log-log, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(report["sizes"], key=int)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in report["sizes"][sizes[0]]["stages"]:
        rows = [int(n) for n in sizes if name in report["sizes"][n]["stages"]]
        for ax, key in zip(axes, ("seconds", "peak_rss_gib"), strict=True):
            ax.plot(rows, [report["sizes"][str(n)]["stages"][name][key] or np.nan for n in rows], "o-", label=name)
    for ax, label in zip(axes, ("wall seconds", "peak RSS (GiB)"), strict=True):
        ax.set(xscale="log", yscale="log", xlabel="training rows", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def tokenize(args) -> int:
    """The encoder's tokenization of the training and test texts (the token cache's first fill)."""
    from comp.outputs.runs import tokenize_tables
    from comp.tables.read import load_competition

    cfg = cli.load_config(args)
    tokenize_tables(cfg, load_competition(cfg), cli.console(args.quiet))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Time each stage of comp, and its peak memory, on tables of growing size built from the config's table."""
    parser = cli.parser("comp.bench_scale", main.__doc__)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="training rows of each table")
    parser.add_argument("--dir", default="data/scale", help="where the tables and their runs go")
    parser.add_argument("--out", default="reports/scale.json", help="where the measurements go")
    parser.add_argument("--tokenize", action="store_true", help=argparse.SUPPRESS)  # one stage, run alone
    args = parser.parse_args(argv)

    def body() -> int:
        if args.tokenize:
            return tokenize(args)
        console, cfg = cli.console(args.quiet), cli.load_config(args)
        try:
            sizes = [int(s) for s in args.sizes.split(",")]
        except ValueError:
            raise CompError(f"--sizes {args.sizes!r}: give row counts separated by commas, e.g. 20000,200000") from None
        out = Path(args.out)
        report = json.loads(out.read_text()) if out.is_file() else {"sizes": {}}  # other sizes measured before
        for rows in sizes:
            folder = Path(args.dir) / str(rows)
            started = time.perf_counter()
            config = build(cfg, rows, folder)
            result = {"build_seconds": round(time.perf_counter() - started, 1), "stages": {}}
            console.print(f"{rows} rows: tables built in {result['build_seconds']}s under {folder}")
            for name, (module, *rest) in stages(config.resolve()):
                result["stages"][name] = r = measured(module, rest, Path.cwd())
                console.print(f"{rows} rows, {name}: {r['seconds']}s, peak RSS {r['peak_rss_gib']} GiB"
                              + (f", failed: {r['error']}" if r["rc"] else ""))
            result["fold_seconds"] = {k: fold_seconds(folder, k) for k in KINDS}
            report["sizes"][str(rows)] = result
            write_json(out, report)
            plot(report, out.with_suffix(".png"))
        console.print(f"wrote {out} and {out.with_suffix('.png')}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
