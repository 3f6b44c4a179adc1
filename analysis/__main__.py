"""python -m analysis runs/embedded [more sweep dirs] --out DIR [--no-reference] [--wandb offline|online] [--from-wandb ENTITY/PROJECT:GROUP]

Reads every `<sweep>/<cell>/result.json` under the folders given and writes summary.csv,
summary_groups.csv, summary.md, the PNG plots and index.html into DIR (open index.html).
Exit status: 0 written, 2 no results / bad folder (the message says which).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .report import analyze


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dirs", nargs="*", type=Path, help="sweep folders (runs/<sweep>) or an output root")
    parser.add_argument(
        "--from-wandb",
        action="append",
        default=[],
        metavar="ENTITY/PROJECT:GROUP",
        help="also read the cells of a W&B group through the public API (online; repeatable)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the report (created)")
    parser.add_argument(
        "--no-reference", action="store_true", help="leave out the TinyLoRA paper's Qwen2.5-7B GSM8K points"
    )
    parser.add_argument(
        "--wandb",
        choices=("offline", "online"),
        default=None,
        help="also log a W&B summary run per sweep (group = sweep, job_type analysis)",
    )
    args = parser.parse_args(argv)
    try:
        page = analyze(
            args.sweep_dirs,
            args.out,
            reference=not args.no_reference,
            wandb_mode=args.wandb,
            wandb_groups=tuple(args.from_wandb),
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
