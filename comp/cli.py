"""What every comp CLI shares: --config / --set, a console, quiet third-party logging."""

from __future__ import annotations

import argparse
import io

from rich.console import Console

from comp import config
from comp.config import Config
from comp.errors import CompError


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the common --config and --set options."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    p.add_argument("--config", default="comp.toml", help="config file (default comp.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--params", metavar="FILE", help="a best-params file from comp.tune (default: run.params)")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    return p


def duration(text: str, flag: str = "--time-limit") -> float:
    """Seconds in a duration such as 90s, 30m, 1.5h or 1h30m (a bare number: minutes)."""
    import re

    number = r"(\d+(?:\.\d+)?)"
    bare = re.fullmatch(number, text.strip())
    parts = re.fullmatch(rf"(?:{number}h)?(?:{number}m)?(?:{number}s)?", text.strip().replace(" ", ""))
    seconds = float(bare.group(1)) * 60 if bare else sum(
        float(v) * k for v, k in zip(parts.groups(), (3600, 60, 1), strict=True) if v) if parts else 0.0
    if seconds <= 0:
        raise CompError(f"{flag} {text!r}: give a duration such as 90s, 30m, 1.5h or 1h30m")
    return seconds


def load_config(args: argparse.Namespace, console: Console | None = None) -> Config:
    """The config named by --config, with --params and --set applied; says which tuned values it applied."""
    cfg = config.load(args.config, args.set, args.params)
    if cfg.applied and not getattr(args, "quiet", False):
        (console or Console(highlight=False, soft_wrap=True)).print(
            "applied tuned params: " + ", ".join(f"{k}={v}" for k, v in cfg.applied))
    return cfg


class LoggingConsole(Console):
    """A console whose printed lines (never its progress bars) can also be collected as a plain-text log."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._log: Console | None = None

    def start_log(self) -> None:
        """Collect from now on what is printed."""
        self._log = Console(file=io.StringIO(), width=160, color_system=None, soft_wrap=True, highlight=False)

    def take_log(self) -> str:
        """What was printed since start_log(); stops collecting."""
        text = self._log.file.getvalue() if self._log else ""
        self._log = None
        return text

    def print(self, *objects, **kwargs) -> None:
        super().print(*objects, **kwargs)
        if self._log is not None:
            self._log.print(*objects, **kwargs)


def console(quiet: bool = False) -> LoggingConsole:
    """The console of a CLI run (quiet: prints to nowhere, logs still collect); quiets transformers' reports."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    plain = not Console().is_terminal  # logs and CI: wide enough that tables keep their columns
    return LoggingConsole(file=io.StringIO() if quiet else None, highlight=False, soft_wrap=True,
                          width=160 if plain or quiet else None)
