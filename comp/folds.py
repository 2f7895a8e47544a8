"""`python -m comp.folds`: split the training rows once into seeded stratified folds and show them."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from rich.table import Table

from comp import cli, metrics
from comp.artifacts import read_json
from comp.config import Config
from comp.errors import CompError, run_cli
from comp.tables.read import Competition, load_competition
from comp.tables.splits import groups_of, import_folds, meta_path, split_fingerprint, split_rows, trained_runs, write_folds


def main(argv: list[str] | None = None) -> int:
    """`python -m comp.folds`: write folds/folds.csv once for the training table."""
    parser = cli.parser("comp.folds", main.__doc__)
    parser.add_argument("--force", action="store_true", help="replace a split that trained folds depend on")
    parser.add_argument("--from", dest="source", metavar="FILE",
                        help="import your own split: a table of the training ids and their fold (0 .. n_splits-1)")
    args = parser.parse_args(argv)

    def body():
        started = time.perf_counter()
        cfg = cli.load_config(args)
        comp = load_competition(cfg)
        if args.source:
            fold = import_folds(cfg, comp, Path(args.source))
        else:
            fold = split_rows(cfg, comp)
        fp = split_fingerprint(cfg, comp, fold, bool(args.source))
        old = read_json(meta_path(cfg)) if meta_path(cfg).is_file() else {}
        dependants = trained_runs(cfg)
        if old and old.get("fingerprint") != fp and dependants and not args.force:
            raise CompError(f"{cfg.folds_path} already holds another split that {len(dependants)} trained fold(s) "
                            f"depend on (e.g. {dependants[0].parent}); pass --force to replace it")
        write_folds(cfg, comp, fold, fp, str(Path(args.source).resolve()) if args.source else "")
        _print_summary(cfg, comp, fold, fp, args.quiet)
        if not args.quiet:
            print(f"folds took {time.perf_counter() - started:.1f}s")
        return 0

    return run_cli(body)


def _print_summary(cfg: Config, comp: Competition, fold: np.ndarray, fp: str, quiet: bool = False) -> None:
    console = cli.console(quiet)
    groups = groups_of(cfg, comp)
    grouped = "" if groups is None else f", {len(set(groups))} groups of {cfg.folds.group!r}"
    table = Table(title=f"{cfg.folds_path}  ({len(fold)} rows{grouped}, fingerprint {fp})")
    table.add_column("fold", justify="right")
    table.add_column("rows", justify="right")
    single = cfg.data.task == metrics.SINGLE
    for c in comp.classes:
        table.add_column(f"{cfg.data.label}={c}" if single else f"{c} (mean)", justify="right")
    for k in range(cfg.folds.n_splits):
        if single:
            shown = map(str, np.bincount(comp.y[fold == k], minlength=len(comp.classes)))
        else:
            shown = (f"{v:.3g}" for v in comp.y[fold == k].mean(0))
        table.add_row(str(k), str(int((fold == k).sum())), *shown)
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
