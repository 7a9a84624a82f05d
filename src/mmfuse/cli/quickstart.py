"""``mmfuse quickstart``: a fusion run and the ablation on the built-in emoji data, offline.

mmfuse quickstart                    # a line per arm as it finishes, then the table
mmfuse -v quickstart                 # and every arm's epochs
"""

from __future__ import annotations

import argparse

from mmfuse.cli.ablate import epoch_lines, print_ablation
from mmfuse.cli.checks import out_dir
from mmfuse.cli.flags import HelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart", help="train and ablate on the built-in emoji data (offline)", formatter_class=HelpFormatter
    )
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--rebuild-data", action="store_true", help="re-render the emoji dataset")
    p.set_defaults(fn=cmd_quickstart)


def cmd_quickstart(args) -> int:
    from mmfuse.recipes.quickstart import quickstart  # deferred: imports torch

    out_dir(args.out)
    with epoch_lines(args.verbose):
        results = quickstart(args.out, rebuild_data=args.rebuild_data)
    print_ablation(results, "emoji quickstart: test split, 9 classes")
    print(
        f"wrote the fusion run to {args.out} (its test scores in {args.out}/eval), the ablation to "
        f"{args.out}/ablation.json and ablation.png"
    )
    return 0
