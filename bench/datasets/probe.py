"""The logistic-regression probe of shared/QUALITY.md on a built set, per modality and on both, by k-fold CV.

    python bench/datasets/probe.py data/breeze-icons            # all.csv of a folder the builders here wrote
    python bench/datasets/probe.py data/debian-apps --k 5

Features are mmfuse's frozen default towers, as bench/cross_validate.py's probe takes them: pooled EfficientNet-Lite0
(1280-d) and mean-pooled MiniLM (384-d), each L2-normalised (cached by mmfuse's feature cache). Scikit-learn
LogisticRegression (C=4) on image, text and both (concatenated), stratified k folds (shuffled, seed 0); prints
weighted F1 mean ± sd over the folds.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="a folder holding all.csv")
    p.add_argument("--k", type=int, default=5, help="number of folds")
    p.add_argument("--C", type=float, default=4.0, help="inverse regularisation of the logistic regression")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold

    from mmfuse.config import ModelConfig
    from mmfuse.data.checks import load_checked
    from mmfuse.features.sources import FeatureCache, build_dataset
    from mmfuse.models.classifier import build_model

    logging.disable(logging.INFO)
    start = time.perf_counter()
    recs = load_checked(str(Path(args.data) / "all.csv"))
    y = np.array([r.label for r in recs])
    model = build_model(ModelConfig(text_pooling="mean"), 2)
    model.freeze_towers()
    ds = build_dataset(model, recs, None, [], FeatureCache(), show=False)
    feats = {m: torch.nn.functional.normalize(ds.sources[m].feats.float(), dim=1).numpy() for m in model.modalities}
    seconds = time.perf_counter() - start
    print(f"{args.data}: {len(recs)} rows, {len(set(y))} classes; features {seconds:.0f} s", flush=True)
    sets = {**{m: feats[m] for m in model.modalities}, "both": np.hstack([feats[m] for m in model.modalities])}
    folds = list(StratifiedKFold(args.k, shuffle=True, random_state=0).split(np.zeros(len(y)), y))
    for name, x in sets.items():
        scores = []
        for train, test in folds:
            clf = LogisticRegression(C=args.C, max_iter=3000).fit(x[train], y[train])
            scores.append(f1_score(y[test], clf.predict(x[test]), average="weighted"))
        mean, sd, each = np.mean(scores), np.std(scores), ", ".join(f"{s:.3f}" for s in scores)
        print(f"probe LR C={args.C:g} {name:<6} weighted F1 {mean:.3f} ± {sd:.3f}  [{each}]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
