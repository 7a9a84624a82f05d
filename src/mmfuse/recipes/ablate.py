"""The modality ablation: image-only, text-only and fusion heads on the same split with the same budget."""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from mmfuse import metrics
from mmfuse.config import RunConfig, resolve
from mmfuse.data.read import read_data
from mmfuse.distributed import launched, main_process
from mmfuse.errors import MmfuseError
from mmfuse.features.sources import FeatureCache, build_dataset
from mmfuse.inference.predictor import evaluate_file
from mmfuse.models.classifier import build_model
from mmfuse.training.fit import fit
from mmfuse.training.prep import load_splits

VARIANTS = {"image": ["image"], "text": ["text"], "fusion": ["image", "text"]}


def ablate(
    cfg: RunConfig,
    out: str | Path,
    test: str | Path | None = None,
    test_captions: str | None = None,
    cache: FeatureCache | None = None,
    fusion_dir: str | Path | None = None,
    parallel: bool | None = None,
) -> dict[str, dict]:
    """Trains the three variants into ``out/<variant>`` and scores each on ``test`` (else on validation).

    All three see the same split, seed and settings, with one exception: a single-modality run that has no tower
    for ``--tune text`` or ``--tune image`` to tune trains a head on frozen features, with the head's own epochs and
    rates unless they were set (with the text fine-tune's 4 epochs, an image-only head on 300 emoji rows scored 0.64
    weighted F1 instead of 0.77, and the ablation overstated fusion's gain). The fusion run goes to ``fusion_dir``
    when given (the quickstart makes its main run directory the fusion model).

    Args:
        parallel: train the three heads at once in forked processes, one CPU thread each. Default: when the
            towers are frozen, there is no GPU, there are several cores and no launch. Each head's steps are too small
            to use two threads well, so processes roughly halve the wall time on two cores; the results are the same.
    """
    out = Path(out)
    if test is not None:
        _check_test_data(cfg, test, test_captions)
    frozen = not cfg.tuned
    if parallel is None:
        # Under accelerate launch the processes already share the cores, and each run's embedding pass is split over
        # them (train.embed_frozen); forked workers cannot share the launch's process group.
        parallel = frozen and not torch.cuda.is_available() and (os.cpu_count() or 1) > 1 and not launched()
    # One cache object for the three runs, holding what it reads: each feature file is read once, not per run.
    cache = cache if cache is not None else FeatureCache(memory=True)
    jobs = []
    for name, run_cfg in variant_configs(cfg).items():
        run_dir = Path(fusion_dir) if name == "fusion" and fusion_dir else out / name
        jobs.append((name, run_cfg, run_dir, test, test_captions, cache))
    # Frozen towers are identical in all three runs: build them once. Fine-tuned ones are changed by each run.
    global _SHARED_TOWERS
    _SHARED_TOWERS = {} if frozen else None
    if parallel and not cfg.data.caption_missing:
        # Embed everything the runs will read once, here, with every core: the workers then only read the cache.
        fusion_cfg, fusion_out = jobs[-1][1], jobs[-1][2]
        fusion_out.mkdir(parents=True, exist_ok=True)
        train, val, labels = load_splits(fusion_cfg, fusion_out)
        # Towers are built only for features missing from the cache (a warm run builds none).
        model = build_model(resolve(fusion_cfg).model, len(labels), _SHARED_TOWERS, build=())
        model.freeze_towers()
        build_dataset(model, train + val, None, [], cache)
    if parallel:
        # Import here what every worker needs, so the forked workers inherit it instead of importing it three times
        # over on the same cores: plotting, and torch._dynamo, which torch.optim imports on an optimizer's first
        # use (2 s of CPU on this machine).
        importlib.import_module("torch._dynamo")  # a plain import here would make `torch` a local name
        metrics._plt()
        context = multiprocessing.get_context("fork")  # workers inherit the towers and imports: no reload
        with ProcessPoolExecutor(len(jobs), mp_context=context) as pool:
            results = dict(zip(VARIANTS, pool.map(_run_variant, jobs, [1] * len(jobs))))
    else:
        results = {job[0]: _run_variant(job) for job in jobs}
    _SHARED_TOWERS = None
    if main_process():  # under accelerate launch, once
        write_ablation(results, out)
    return results


_SHARED_TOWERS: dict | None = None  # shared with the forked workers of ``ablate``


def variant_configs(cfg: RunConfig) -> dict[str, RunConfig]:
    """Each variant's config: the same settings, except that a single-modality run with no tower for ``--tune text``
    or ``--tune image`` to tune trains a head on frozen features, with the head's own budget unless one was set."""
    out = {}
    for name, modalities in VARIANTS.items():
        changes = {"model": {"modalities": modalities}}
        if len(modalities) == 1:
            changes["model"]["modality_dropout"] = 0.0
            if cfg.train.tune in ("text", "image") and cfg.train.tune not in modalities:
                changes["train"] = {"tune": "head"}
        out[name] = cfg.updated(changes)
    return out


def _check_test_data(cfg: RunConfig, test: str | Path, test_captions: str | None) -> None:
    """--test is read (not yet checked row by row) before three models are trained: a missing or malformed file, or
    a label the training data lacks, would otherwise stop the ablation only at its end (and a rerun then needed
    --overwrite). Labels are compared from the files alone; with --skip-bad, rows of unknown labels are skipped."""
    test_labels = {r.label for r in read_data(test, test_captions, need_label=True)[0]}
    if cfg.data.skip_bad:
        return
    known = {r.label for r in read_data(cfg.data.train, cfg.data.captions, need_label=True)[0]}
    unknown = sorted(test_labels - known - {None, ""})
    if unknown:
        raise MmfuseError(
            f"--test {test} has label(s) the training data {cfg.data.train} lacks: {', '.join(map(str, unknown[:10]))}"
            f"{' ...' * (len(unknown) > 10)}. Fix the labels, or pass --skip-bad to score the test rows the models "
            "know."
        )


def _run_variant(job: tuple, threads: int | None = None) -> dict:
    name, run_cfg, run_dir, test, test_captions, cache = job
    if threads:
        # Before any tensor operation: a forked child that enters an OpenMP parallel region the parent's thread
        # pool had started hangs for good (GNU OpenMP is not fork-safe). One thread never enters one.
        torch.set_num_threads(threads)
    fitted = fit(run_cfg, run_dir, cache=cache, towers=_SHARED_TOWERS)
    if test is not None:
        report = evaluate_file(run_dir, test, run_dir / "test", captions=test_captions, skip_bad=run_cfg.data.skip_bad)
    else:
        report = fitted["val"]
    result = {k: report[k] for k in ("accuracy", "weighted_f1", "macro_f1")}
    result["evaluated_on"] = "test" if test is not None else "validation"
    result["run_dir"] = str(run_dir)
    return result


def write_ablation(results: dict[str, dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    metrics.plot_bars(results, out / "ablation.png")
