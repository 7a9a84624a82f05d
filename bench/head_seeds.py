"""Head-training recipes over several seeds, on the quickstart's cached features: validation and test weighted F1.

    python bench/head_seeds.py '{"best": {}, "last": {"train.keep": "last"}}' 0,1,2,3,4
    python bench/head_seeds.py '{"e15": {"train.epochs": 15}}' 0 image     # one modality

Each recipe is a JSON object of ``section.field`` overrides of the quickstart's config (``train.epochs``,
``model.input_dropout``, ...). Every seed trains with ``mmfuse.training.fit.fit`` into ``--out/<recipe>-<seed>`` and is
scored with ``mmfuse.inference.predictor.evaluate_file`` on the test split. Run the quickstart once first so the
features are
cached ($MMFUSE_HOME); otherwise the first fit embeds them.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", help='JSON: {"name": {"train.epochs": 15, ...}, ...}')
    p.add_argument("seeds", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("modalities", nargs="?", default="image,text", help="default image,text (the fusion head)")
    p.add_argument("--out", default="/tmp/mmfuse-head-seeds", help="where the runs go")
    args = p.parse_args()

    from mmfuse.data.datasets.emoji import emoji_dataset
    from mmfuse.inference.predictor import evaluate_file
    from mmfuse.recipes.quickstart import quickstart_config
    from mmfuse.training.fit import fit

    logging.disable(logging.INFO)
    data = emoji_dataset()
    towers: dict = {}  # frozen towers, built once for every run
    for name, overrides in json.loads(args.recipes).items():
        vals, tests = [], []
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = quickstart_config(data)
            cfg.train.seed, cfg.model.modalities = seed, args.modalities.split(",")
            for key, value in overrides.items():
                section, field = key.split(".")
                setattr(getattr(cfg, section), field, value)
            run = Path(args.out) / f"{name}-{seed}"
            vals.append(fit(cfg, run, towers=towers)["val"]["weighted_f1"])
            tests.append(evaluate_file(run, data / "test.csv", run / "test")["weighted_f1"])
        print(
            f"{name:<30} val {statistics.mean(vals):.4f} ± {statistics.pstdev(vals):.4f}  "
            f"test {statistics.mean(tests):.4f} ± {statistics.pstdev(tests):.4f}  {[round(t, 3) for t in tests]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
