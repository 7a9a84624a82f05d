"""The modality ablation: image-only, text-only and fusion heads on the same split with the same budget."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from . import metrics
from .config import RunConfig
from .features import FeatureCache
from .predict import evaluate_file
from .train import fit

VARIANTS = {"image": ["image"], "text": ["text"], "fusion": ["image", "text"]}


def ablate(
    cfg: RunConfig,
    out: str | Path,
    test: str | Path | None = None,
    test_captions: str | None = None,
    cache: FeatureCache | None = None,
    fusion_dir: str | Path | None = None,
) -> dict[str, dict]:
    """Trains the three variants into ``out/<variant>`` and scores each on ``test`` (else on validation).

    All three see the same split, seed, epochs and learning rate. The fusion run goes to ``fusion_dir`` when
    given (the quickstart makes its main run directory the fusion model).
    """
    out = Path(out)
    results = {}
    for name, modalities in VARIANTS.items():
        run_cfg = copy.deepcopy(cfg)
        run_cfg.model.modalities = modalities
        if len(modalities) == 1:
            run_cfg.model.modality_dropout = 0.0
        run_dir = Path(fusion_dir) if name == "fusion" and fusion_dir else out / name
        fitted = fit(run_cfg, run_dir, cache=cache)
        if test is not None:
            report = evaluate_file(run_dir, test, run_dir / "test", captions=test_captions, skip_bad=cfg.data.skip_bad)
        else:
            report = fitted["val"]
        results[name] = {k: report[k] for k in ("accuracy", "weighted_f1", "macro_f1")}
        results[name]["evaluated_on"] = "test" if test is not None else "validation"
        results[name]["run_dir"] = str(run_dir)
    write_ablation(results, out)
    return results


def write_ablation(results: dict[str, dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    metrics.plot_bars(results, out / "ablation.png")
