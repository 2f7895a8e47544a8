"""`python -m comp.tune`: an Optuna search over the learning rates, dropout and any other train / model key."""

from __future__ import annotations

import gc
import hashlib
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table
from sklearn.model_selection import train_test_split

from comp import cli, metrics
from comp.artifacts import atomic_path, write_text
from comp.classical.baselines import fit_classical
from comp.classical.text import Counts
from comp.config import CLASSICAL_KEYS, MONITORS, Config, dump_toml, from_dict, set_key
from comp.errors import CompError, run_cli
from comp.nn.state import optimizer_class
from comp.outputs.collect import split
from comp.outputs.runs import classical_row, fit_split, tokenize_tables
from comp.tables import identity
from comp.tables.read import Competition, load_competition, strata
from comp.tables.splits import load_folds, split_rows

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Optuna 4.9 renamed the callback that re-queues the trials of a dead worker.
RetryCallback = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback


def metric_of(cfg: Config) -> str:
    """The quantity a trial returns: tune.metric, or the one early stopping monitors."""
    return cfg.tune.direction_metric or cfg.train.monitor


def with_params(cfg: Config, params: dict) -> Config:
    """The base config with `section.key` values replaced, validated like a config file."""
    raw = cfg.to_dict()
    for key, value in params.items():
        section, _, name = key.partition(".")
        set_key(raw, section, name, value, "the search space")
    return from_dict(raw, root=cfg.root, source="the search space")


def suggest(trial: optuna.Trial, key: str, spec: dict):
    """One value from a search-space entry."""
    kind = spec["type"]
    if kind == "categorical":  # a list choice (an n-gram range) goes through Optuna as its JSON text
        choices = [json.dumps(c) if isinstance(c, list) else c for c in spec["choices"]]
        return decoded(trial.suggest_categorical(key, choices))
    if kind == "int":
        return trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)),
                                 log=bool(spec.get("log", False)))
    return trial.suggest_float(key, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                               log=bool(spec.get("log", False)))


def decoded(value):
    """A trial's value as the config takes it: a list choice was stored as its JSON text."""
    return json.loads(value) if isinstance(value, str) and value.startswith("[") else value


def tune_folds(cfg: Config) -> list[int]:
    """The folds every trial trains."""
    folds = list(range(cfg.folds.n_splits)) if cfg.tune.folds == "all" else list(cfg.tune.folds)
    bad = [k for k in folds if not 0 <= k < cfg.folds.n_splits]
    if bad:
        raise CompError(f"tune.folds names fold {bad[0]}, but folds.n_splits is {cfg.folds.n_splits}")
    return folds


def open_storage(cfg: Config, url: str | None):
    """The study's storage: a SQLite file beside the folds by default, any RDB URL, or journal:PATH."""
    url = url or cfg.tune.storage or f"sqlite:///{(cfg.folds_path.parent / 'tune.db').resolve()}"
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        path = path if path.is_absolute() else cfg.root / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path))), url
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = RetryCallback(max_retry=cfg.tune.max_retry)
                storage = RDBStorage(url, heartbeat_interval=cfg.tune.heartbeat_interval,
                                     grace_period=cfg.tune.grace_period, heartbeat_stale_trial_callback=retry)
            return storage, url
        except Exception as exc:  # noqa: BLE001 - sqlalchemy and drivers raise many types
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
            if attempt < 4 and not isinstance(exc, ImportError):
                # workers started together race to create the same tables; the loser finds them made
                time.sleep(0.5 * (attempt + 1))
                continue
            raise CompError(f"tune storage {url!r} could not be opened ({first}); check --storage / tune.storage") from None


def make_pruner(cfg: Config, n_folds: int) -> optuna.pruners.BasePruner:
    """median (default), hyperband or none; steps are epochs counted across the trial's folds."""
    t = cfg.tune
    if t.pruner == "none":
        return optuna.pruners.NopPruner()
    if t.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.train.epochs * n_folds)
    return optuna.pruners.MedianPruner(n_startup_trials=t.pruner_startup_trials, n_warmup_steps=t.pruner_warmup_epochs)


def inner_split(cfg: Config, comp: Competition, folds: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows a trial trains and validates on for `fold`: that fold's training part, split again as comp.folds
    splits the table (inner part 0 validates). The fold's own validation rows, whose CV comp.submit reports
    after training with the tuned values, never choose them."""
    tr, _ = split(folds, fold)
    inner = split_rows(cfg, comp, tr, seed=cfg.folds.seed + 1 + fold)
    return tr[inner != 0], tr[inner == 0]


def study_key(cfg: Config, comp: Competition, folds_fp: str, fold_ids: list[int]) -> str:
    """What a study's trials depend on besides the searched values: the base config (the searched keys at their
    lower ends), the tables' and model's content, the split, the tuned folds, the metric, the trial's share
    of rows and the space."""
    lows = {key: spec["choices"][0] if spec["type"] == "categorical" else spec["low"]
            for key, spec in cfg.tune.space.items()}
    what = {"config": with_params(cfg, lows).hash(), "content": identity.content(cfg, comp), "folds": folds_fp,
            "tuned": fold_ids, "metric": metric_of(cfg), "train_fraction": cfg.tune.train_fraction,
            "space": cfg.tune.space, "validation": "inner"}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_share(cfg: Config, comp: Competition, tr: np.ndarray, fold: int) -> np.ndarray:
    """tune.train_fraction < 1: a seeded stratified share of a fold's training rows (all of them at 1)."""
    if cfg.tune.train_fraction >= 1.0:
        return tr
    keep = max(len(comp.classes), int(round(cfg.tune.train_fraction * len(tr))))
    groups = strata(cfg.data.task, comp.y[tr])
    tr, _ = train_test_split(tr, train_size=keep, random_state=cfg.folds.seed + fold, stratify=groups)
    return np.sort(tr)


class Objective:
    """Trains the configured folds with a trial's values through the same fold wiring as comp.train; the
    tokens follow the trial's config (through the token cache), so max_length or the model may be searched."""

    def __init__(self, cfg: Config, comp: Competition, folds: np.ndarray, console: Console, worker_id: int = 0):
        self.cfg, self.comp, self.folds, self.worker_id = cfg, comp, folds, worker_id
        self.console, self.fold_ids, self.metric = console, tune_folds(cfg), metric_of(cfg)
        self.counts = Counts()  # n-gram counts every classical trial shares

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", self.worker_id)
        params = {key: suggest(trial, key, spec) for key, spec in self.cfg.tune.space.items()}
        cfg = with_params(self.cfg, params)
        if cfg.model.kind != "encoder":
            return self.classical(cfg, trial)
        tokens = tokenize_tables(cfg, self.comp, self.console, with_test=False)
        values, epochs_run = [], 0
        try:
            for i, k in enumerate(self.fold_ids):
                tr, va = inner_split(cfg, self.comp, self.folds, k)

                def on_epoch(row: dict, offset: int = i * cfg.train.epochs, fold: int = k) -> None:
                    nonlocal epochs_run
                    epochs_run += 1
                    trial.set_user_attr("epochs_run", epochs_run)
                    value = row[self.metric]
                    if not math.isfinite(value):
                        raise optuna.TrialPruned(f"{self.metric} is {value}")
                    trial.report(value, offset + row["epoch"])
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"{self.metric} {value:.4f} at epoch {row['epoch']} of fold {fold}")

                _, result = fit_split(cfg, self.comp, (train_share(cfg, self.comp, tr, k), va), k, tokens,
                                      self.console, on_epoch=on_epoch)
                values.append(result.best_row[self.metric])
                del result
        finally:
            gc.collect()  # release the trial's model, optimizer and tensors before the next one
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        trial.set_user_attr("fold_values", values)
        return float(np.mean(values))

    def classical(self, cfg: Config, trial: optuna.Trial) -> float:
        """A linear or gbm trial: each tuned fold's model fitted on its inner training rows (a gbm run's rounds
        stopping on the inner validation rows), scored on those; one report per fold."""
        values, text = [], np.array(self.comp.train_text, dtype=object)
        for i, k in enumerate(self.fold_ids):
            tr, va = inner_split(cfg, self.comp, self.folds, k)
            tr = train_share(cfg, self.comp, tr, k)
            rows = (self.comp.train.iloc[va], list(text[va]), self.comp.y[va])
            model = fit_classical(cfg, self.comp.train.iloc[tr], list(text[tr]), self.comp.y[tr],
                                  len(self.comp.classes), cfg.train.seed + k, valid=rows, counts=self.counts)
            value = classical_row(metrics.score(self.comp.y[va], model.logits(rows[0], rows[1]), cfg.data.task))[self.metric]
            trial.report(value, i)
            values.append(value)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{self.metric} {value:.4f} on fold {k}")
        trial.set_user_attr("fold_values", values)
        return float(np.mean(values))


def run_study(cfg: Config, storage_url: str | None = None, n_trials: int | None = None, worker_id: int = 0,
              study_name: str | None = None, console: Console | None = None) -> optuna.Study:
    """Create or continue the study and run trials until it holds n_trials finished ones."""
    console = console or cli.console()
    comp = load_competition(cfg)
    folds, folds_fp = load_folds(cfg, comp)
    fold_ids = tune_folds(cfg)
    if cfg.train.pseudo_run:
        raise CompError("comp.tune does not add pseudo-labelled rows: tune without train.pseudo_run, then train "
                        "the pseudo-label round with the tuned params")
    idle = [k for k in cfg.tune.space if cfg.model.kind != "encoder" and not k.startswith(CLASSICAL_KEYS)]
    if idle:
        raise CompError(f"tune.space key {idle[0]!r} changes nothing a {cfg.model.kind} run learns: search "
                        "model.tfidf.*, model.gbm.* or the metadata encoding's model.min_category_rows / "
                        "model.numeric_transform")
    for key, spec in cfg.tune.space.items():  # every end of every range must make a valid config
        ends = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        for value in ends:
            with_params(cfg, {key: value})
    storage, url = open_storage(cfg, storage_url)
    name = study_name or cfg.tune.study_name or cfg.run.name
    direction = "minimize" if MONITORS[metric_of(cfg)] == "min" else "maximize"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=cfg.tune.seed + worker_id)
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction=direction,
                                    pruner=make_pruner(cfg, len(fold_ids)), load_if_exists=True)
    except ValueError as exc:
        raise CompError(f"study {name!r} in {url} cannot be continued: {exc}; pick another tune.study_name") from None
    key = study_key(cfg, comp, folds_fp, fold_ids)
    if study.trials and study.user_attrs.get("base") != key:
        raise CompError(f"study {name!r} in {url} holds trials of another base config, tables, split or search "
                        "space: pass --study NEW (or set tune.study_name) for a fresh study, or restore what it ran on")
    study.set_user_attr("base", key)
    study.set_user_attr("metric", metric_of(cfg))
    target = n_trials or cfg.tune.n_trials
    done = sum(t.state in FINISHED for t in study.trials)
    console.print(f"study {name!r} in {url}: {done} finished trial(s), target {target}; "
                  f"{metric_of(cfg)} ({direction}) on fold(s) {fold_ids}")
    objective = Objective(cfg, comp, folds, console, worker_id)

    def announce(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        value = "" if trial.value is None else f"{trial.value:.4f}"
        console.print(f"trial {trial.number} {trial.state.name.lower()} {value} after "
                      f"{trial.user_attrs.get('epochs_run', 0)} epoch(s): "
                      + ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items()))

    interrupted = False
    if done < target:
        try:
            study.optimize(objective, n_trials=target - done, timeout=cfg.tune.timeout or None, gc_after_trial=False,
                           callbacks=[MaxTrialsCallback(target, states=FINISHED), announce])
        except KeyboardInterrupt:
            interrupted = True
    summarize(cfg, study, console, len(fold_ids))
    if interrupted:
        raise KeyboardInterrupt
    return study


def summarize(cfg: Config, study: optuna.Study, console: Console, n_folds: int) -> None:
    """The top trials, the counts, the epochs pruning saved; the best params file and the plots."""
    trials = study.trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    keys = list(cfg.tune.space)
    table = Table(title=f"study {study.study_name!r}: top trials by {study.user_attrs.get('metric', 'value')}")
    for col in ("trial", "value", *(k.partition(".")[2] for k in keys), "epochs", "state"):
        table.add_column(col, justify="right", no_wrap=True)
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    ranked = sorted(complete, key=lambda t: t.value, reverse=reverse) + pruned
    for t in ranked[:10]:
        table.add_row(str(t.number), "" if t.value is None else f"{t.value:.4f}",
                      *(_fmt(t.params.get(k, "")) for k in keys), str(t.user_attrs.get("epochs_run", "")),
                      t.state.name.lower())
    console.print(table)
    full = cfg.train.epochs * n_folds
    finished = complete + pruned
    run_epochs = sum(t.user_attrs.get("epochs_run", 0) for t in finished)
    saved = 1 - run_epochs / (full * len(finished)) if finished else 0.0
    console.print(f"{len(complete)} complete, {len(pruned)} pruned, {len(failed)} failed; pruning saved "
                  f"{saved:.0%} of the epochs ({run_epochs} run of {full * len(finished)})")
    if not complete:
        return
    best = study.best_trial
    tables: dict[str, dict] = {}
    for key, value in best.params.items():
        section, _, name = key.partition(".")
        tables.setdefault(section, {})[name] = decoded(value)
    path = cfg.path(cfg.tune.best_params)
    write_text(path, f"# best trial {best.number} of study {study.study_name!r}: "
                     f"{study.user_attrs.get('metric', 'value')} {best.value:.6g}\n" + dump_toml(tables))
    console.print(f"best trial {best.number}: {best.value:.4f}; wrote {path} "
                  f"(apply it with python -m comp.train --params {cfg.tune.best_params} or run.params)")
    write_plots(study, path.parent / f"{study.study_name}", console)


def write_plots(study: optuna.Study, stem: Path, console: Console) -> None:
    """Optimization history and parameter importances as PNGs (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    for suffix, plot in (("history", ovm.plot_optimization_history), ("importances", ovm.plot_param_importances)):
        out = Path(f"{stem}_{suffix}.png")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
                fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                with atomic_path(out) as tmp:
                    fig.savefig(tmp, format="png", dpi=100)
                plt.close(fig)
            console.print(f"wrote {out}")
        except (ValueError, RuntimeError) as exc:
            console.print(f"no {suffix} plot yet: {exc}")


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    """Search the learning rates and dropout (and any key in [tune.space]); write the best params file."""
    parser = cli.parser("comp.tune", main.__doc__)
    parser.add_argument("--storage", help="an Optuna storage URL (sqlite:///..., postgresql://...) or journal:PATH "
                                          "(default: tune.storage, else sqlite beside the folds)")
    parser.add_argument("--n-trials", type=int, help="finished trials the study should hold (default tune.n_trials)")
    parser.add_argument("--study", help="study name (default tune.study_name, else run.name)")
    parser.add_argument("--worker-id", type=int, default=0,
                        help="give each concurrent worker its own id: it offsets the sampler's seed")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.n_trials is not None and args.n_trials < 1:
            raise CompError("--n-trials must be >= 1")
        started = time.perf_counter()
        cfg = cli.load_config(args)
        optimizer_class(cfg.train)  # refused before the study is created
        if cfg.train.teacher:
            raise CompError(f"comp.tune does not tune a distilled run (train.teacher = {cfg.train.teacher!r}): tune "
                            "the student without it (--set train.teacher=''), then train it with the teacher")
        run_study(cfg, args.storage, args.n_trials, args.worker_id, args.study, cli.console(args.quiet))
        print(f"tuning took {time.perf_counter() - started:.0f}s")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
