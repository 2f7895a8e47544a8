"""What every comp CLI shares: --config / --set, a console, quiet third-party logging."""

from __future__ import annotations

import argparse

from rich.console import Console

from comp import config
from comp.config import Config


def parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the common --config and --set options."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    p.add_argument("--config", default="comp.toml", help="config file (default comp.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--params", metavar="FILE", help="a best-params file from comp.tune (default: run.params)")
    return p


def load_config(args: argparse.Namespace, console: Console | None = None) -> Config:
    """The config named by --config, with --params and --set applied; says which tuned values it applied."""
    cfg = config.load(args.config, args.set, args.params)
    if cfg.applied:
        (console or Console(highlight=False, soft_wrap=True)).print(
            "applied tuned params: " + ", ".join(f"{k}={v}" for k, v in cfg.applied))
    return cfg


def console() -> Console:
    """A console for a CLI run; also quiets transformers' load reports and download bars."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return Console(highlight=False, soft_wrap=True)
