"""The modality ablation: image-only, text-only and fusion arms trained alike on the same split, then scored; with
--tabular-columns, a tabular arm too (a head on the tabular columns alone), and fusion of all three.

    mmfuse ablate DATA --out OUT [--test TEST]         # every arm a head on frozen features (--tune head)
    mmfuse ablate DATA --out OUT --tune all            # every arm fine-tunes the towers it has (wants a GPU)

Like for like: every arm has the same tune mode, applied to the towers that arm has, and the same epochs, batch
size, learning rates, epoch kept and seed. ``--tune text`` or ``image`` would fine-tune a tower in two arms and leave
the third a frozen head, so the ablation refuses them. ``ablation.json`` and the printed table say how each arm was
trained.
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from mmfuse import metrics
from mmfuse.config import RunConfig, resolve
from mmfuse.data.columns import Columns
from mmfuse.data.read import read_data
from mmfuse.data.records import label_names
from mmfuse.data.tabular import fit_tabular
from mmfuse.distributed import launched, main_process
from mmfuse.errors import MmfuseError
from mmfuse.features.sources import FeatureCache, build_dataset
from mmfuse.inference.predictor import evaluate_file
from mmfuse.models.classifier import build_model
from mmfuse.training.fit import fit
from mmfuse.training.prep import forced_multilabel, load_splits

log = logging.getLogger(__name__)
VARIANTS = {"image": ["image"], "text": ["text"], "fusion": ["image", "text"]}
TABULAR_VARIANTS = {
    "image": ["image"],
    "text": ["text"],
    "tabular": ["tabular"],
    "fusion": ["image", "text", "tabular"],
}


def variants(cfg: RunConfig) -> dict[str, list[str]]:
    """The arms and their modalities: a tabular arm, and tabular in fusion, when the data has tabular columns."""
    return TABULAR_VARIANTS if cfg.model.tabular_columns else VARIANTS


# The tune modes an ablation can give every arm alike; each arm applies it to the towers it has.
ABLATION_TUNES = ("head", "all")
# The budget every arm shares: the fusion arm's, resolved for its tune mode and pinned in the others.
BUDGET = ("epochs", "batch_size", "lr", "head_lr")


def ablate(
    cfg: RunConfig,
    out: str | Path,
    test: str | Path | None = None,
    test_captions: str | None = None,
    cache: FeatureCache | None = None,
    fusion_dir: str | Path | None = None,
    parallel: bool | None = None,
) -> dict[str, dict]:
    """Trains the three arms into ``out/<arm>`` and scores each on ``test`` (else on validation), each into its
    run's ``eval/``; returns, per arm, the scores, the kept epoch, its validation weighted F1, the seconds it took
    and how it was trained (``training``). The fusion run goes to ``fusion_dir`` when given (the quickstart makes its
    main run directory the fusion model). ``variant_configs`` says how the arms are made alike.

    Args:
        parallel: train the three heads at once in forked processes, one CPU thread each. Default: when the
            towers are frozen, there is no GPU, there are several cores and no launch. Each head's steps are too small
            to use two threads well, so processes roughly halve the wall time on two cores; the results are the same.
    """
    out = Path(out)
    configs = variant_configs(cfg)  # bad settings stop here, before any data is read
    if test is not None:
        _check_test_data(cfg, test, test_captions)
    frozen = not any(c.tuned for c in configs.values())
    if parallel is None:
        # Under accelerate launch the processes already share the cores, and each run's embedding pass is split over
        # them (train.embed_frozen); forked workers cannot share the launch's process group.
        parallel = frozen and not torch.cuda.is_available() and (os.cpu_count() or 1) > 1 and not launched()
    if main_process():
        log.info("ablation: %s", describe({name: training_of(c) for name, c in configs.items()}))
    # One cache object for the three runs, holding what it reads: each feature file is read once, not per run.
    cache = cache if cache is not None else FeatureCache(memory=True)
    jobs = []
    for name, run_cfg in configs.items():
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
        resolved = resolve(fusion_cfg).model
        spec = fit_tabular(train, resolved.tabular_columns) if "tabular" in resolved.modalities else None
        model = build_model(resolved, len(labels), _SHARED_TOWERS, build=(), tabular=spec)
        model.freeze_towers()
        build_dataset(model, train + val, None, [], cache)
    results = {}
    if parallel:
        # Import here what every worker needs, so the forked workers inherit it instead of importing it three times
        # over on the same cores: plotting, and torch._dynamo, which torch.optim imports on an optimizer's first
        # use (2 s of CPU on this machine).
        importlib.import_module("torch._dynamo")  # a plain import here would make `torch` a local name
        metrics._plt()
        context = multiprocessing.get_context("fork")  # workers inherit the towers and imports: no reload
        with ProcessPoolExecutor(len(jobs), mp_context=context) as pool:
            running = {pool.submit(_run_variant, job, 1): job[0] for job in jobs}
            for done in as_completed(running):  # a line as each arm finishes, not three at the end
                results[running[done]] = _finished(running[done], done.result())
    else:
        for job in jobs:
            results[job[0]] = _finished(job[0], _run_variant(job))
    _SHARED_TOWERS = None
    results = {name: results[name] for name in configs}
    if main_process():  # under accelerate launch, once
        write_ablation(results, out)
    return results


_SHARED_TOWERS: dict | None = None  # shared with the forked workers of ``ablate``


def variant_configs(cfg: RunConfig) -> dict[str, RunConfig]:
    """Each arm's config, trained alike: ``cfg``'s tune mode applied to the towers the arm has (``all``: the image
    arm tunes its image tower, the text arm its text tower, fusion both), and the fusion arm's epochs, batch size and
    learning rates for every arm. A ``--tune text`` or ``image`` that was not asked for (the train default) becomes
    ``head``; asked for, it is refused, since the arm without that tower would be a frozen head beside fine-tuned
    ones (which overstated fusion's gain: issue 24)."""
    t = cfg.train
    tune = t.tune
    if tune not in ABLATION_TUNES:
        if "tune" in cfg.asked.get("train", ()):
            other = "image" if tune == "text" else "text"
            raise MmfuseError(
                f"--tune {tune} would fine-tune the {tune} tower in the {tune} and fusion arms but leave the {other} "
                f"arm a head on frozen features, so the arms would not be trained alike. Pass --tune head (the "
                "ablation's default: every arm a head on frozen features) or --tune all (every arm fine-tunes the "
                "towers it has)."
            )
        tune = "head"  # the ablation's own default: train's (--tune text) has no tower to tune in the image arm
    if tune == "head" and (t.lora or t.tune_layers):
        flag = "--lora" if t.lora else "--tune-layers"
        raise MmfuseError(
            f"{flag} applies to fine-tuned towers, and this ablation trains heads on frozen features (--tune head): "
            f"pass --tune all with it (every arm fine-tunes the towers it has), or leave {flag} out."
        )
    if t.bag > 1:  # fit trains one model: a bag asked for would be dropped without a word
        raise MmfuseError(
            f"mmfuse ablate trains each arm as one run, not a bag of {t.bag}: pass --bag 1 (--preset best sets "
            "--bag 5), or train a bag with mmfuse train --bag."
        )
    base = cfg.updated({"train": {"tune": tune}}) if tune != t.tune else cfg
    if tune != t.tune:
        base.asked["train"].remove("tune")  # the ablation's default, not the user's: --config re-derives from it
    arms = variants(cfg)
    fusion = base.updated({"model": {"modalities": arms["fusion"]}})
    budget = {key: getattr(resolve(fusion).train, key) for key in BUDGET}
    out = {}
    for name, modalities in arms.items():
        changes = {"model": {"modalities": modalities}}
        if len(modalities) == 1:
            changes["model"]["modality_dropout"] = 0.0  # dropping the only modality leaves nothing to learn from
            if tune == "all":
                # Tune mode all on one tower is that tower's mode, whose own defaults differ from all's: pin the budget.
                # The tabular arm has no tower: a head, on the same budget.
                changes["train"] = {"tune": modalities[0] if modalities[0] != "tabular" else "head", **budget}
        out[name] = base.updated(changes)
    return out


def training_of(cfg: RunConfig) -> dict:
    """How an arm is trained, from its resolved config: what ablation.json records and ``describe`` says."""
    r = resolve(cfg)
    t = r.train
    return {
        "tune": t.tune,
        "tuned_towers": r.tuned,
        "frozen_towers": [m for m in r.model.modalities if m not in r.tuned],
        **{key: getattr(t, key) for key in BUDGET},
        "keep": t.keep,
        "seed": t.seed,
    }


def describe(trainings: dict[str, dict]) -> str:
    """In plain words, how the arms were trained (one sentence when they share it, which ``variant_configs``
    ensures; a sentence per arm otherwise)."""

    def budget(x: dict) -> str:
        rates = f"learning rate {x['lr']:g}" + (f" (head {x['head_lr']:g})" if x["head_lr"] != x["lr"] else "")
        kept = "the last epoch kept" if x["keep"] == "last" else "the epoch best on validation kept"
        epochs = f"{x['epochs']} epoch{'s' * (x['epochs'] != 1)}"
        return f"{epochs} of batch {x['batch_size']} at {rates}, {kept}, seed {x['seed']}"

    def towers(name: str, x: dict) -> str:
        if not x["tuned_towers"]:
            return f"{name}: a head on frozen features"
        return f"{name}: fine-tunes its {' and '.join(x['tuned_towers'])} tower{'s' * (len(x['tuned_towers']) > 1)}"

    shared = {key: {x[key] for x in trainings.values()} for key in (*BUDGET, "keep", "seed")}
    tuning = {bool(x["tuned_towers"]) for x in trainings.values()}  # every arm a head, or every arm tuning towers
    if all(len(v) == 1 for v in shared.values()) and len(tuning) == 1:
        first = next(iter(trainings.values()))
        if tuning == {False}:
            how = "each a head on frozen features (--tune head)"
        else:
            tuned = ", ".join(f"{n} its {' and '.join(x['tuned_towers'])}" for n, x in trainings.items())
            how = f"each fine-tuning the towers it has (--tune all: {tuned})"
        names = list(trainings)
        arms = f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]
        return f"the {arms} arms trained alike, {how}: {budget(first)}"
    return "; ".join(f"{towers(n, x)}, {budget(x)}" for n, x in trainings.items())


def _finished(name: str, result: dict) -> dict:
    """One line as an arm finishes (its epochs' lines show only with -v): the compact display of a parallel run."""
    if main_process():
        kept = "last" if result["training"]["keep"] == "last" else "best"
        log.info(
            "%s arm done: %s epoch %d of %d, validation weighted F1 %.4f, macro F1 %.4f, %.1f s",
            name,
            kept,
            result["best_epoch"],
            result["epochs_run"],
            result["val_weighted_f1"],
            result["val_macro_f1"],
            result["seconds"],
        )
    return result


def _check_test_data(cfg: RunConfig, test: str | Path, test_captions: str | None) -> None:
    """--test is read (not yet checked row by row) before three models are trained: a missing or malformed file, or
    a label the training data lacks, would otherwise stop the ablation only at its end (and a rerun then needed
    --overwrite). Labels are compared from the files alone; with --skip-bad, rows of unknown labels are skipped."""
    named = Columns.of(cfg.model)
    sets = {"multi_label": forced_multilabel(cfg), "label_sep": cfg.data.label_sep}  # read as training will
    rows = read_data(test, test_captions, need_label=True, **sets, named=named)[0]
    test_labels = {x for r in rows for x in label_names(r)}
    if cfg.data.skip_bad:
        return
    train = read_data(cfg.data.train, cfg.data.captions, need_label=True, **sets, named=named)[0]
    known = {x for r in train for x in label_names(r)}
    unknown = sorted(test_labels - known - {None, ""})
    if unknown:
        raise MmfuseError(
            f"--test {test} has label(s) the training data {cfg.data.train} lacks: {', '.join(map(str, unknown[:10]))}"
            f"{' ...' * (len(unknown) > 10)}. Fix the labels, or pass --skip-bad to score the test rows the models "
            "know."
        )


class _NotATerminal:
    """A forked worker's stderr: the same stream, but never a terminal, so three workers draw no progress bars over
    each other's (their carriage returns would garble one line); log lines still reach it whole."""

    def __init__(self, stream):
        self._stream = stream

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _run_variant(job: tuple, threads: int | None = None) -> dict:
    name, run_cfg, run_dir, test, test_captions, cache = job
    start = time.perf_counter()
    if threads:
        # Before any tensor operation: a forked child that enters an OpenMP parallel region the parent's thread
        # pool had started hangs for good (GNU OpenMP is not fork-safe). One thread never enters one.
        torch.set_num_threads(threads)
        sys.stderr = _NotATerminal(sys.stderr)  # threads: a forked worker, one of several at once
    fitted = fit(run_cfg, run_dir, cache=cache, towers=_SHARED_TOWERS)
    if test is not None:
        # eval/, where mmfuse evaluate RUN writes by default: one folder name for a run's scores on held-out data
        report = evaluate_file(run_dir, test, run_dir / "eval", captions=test_captions, skip_bad=run_cfg.data.skip_bad)
    else:
        report = fitted["val"]
    result = {k: report[k] for k in ("accuracy", "weighted_f1", "macro_f1")}
    result |= {k: report[k] for k in ("micro_f1", "samples_f1", "map") if k in report}  # a multi-label run's
    result["evaluated_on"] = "test" if test is not None else "validation"
    result["best_epoch"], result["epochs_run"] = fitted["best_epoch"], fitted["epochs_run"]
    result["val_weighted_f1"] = fitted["val"]["weighted_f1"]
    result["val_macro_f1"] = fitted["val"]["macro_f1"]
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["training"] = training_of(run_cfg)
    result["run_dir"] = str(run_dir)
    return result


def write_ablation(results: dict[str, dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    x = next(iter(results.values()))["training"]
    trained = "heads on frozen features" if x["tune"] == "head" else "each arm fine-tunes the towers it has"
    title = (
        f"modality ablation on {next(iter(results.values()))['evaluated_on']}\n"
        f"every arm --tune {'head' if x['tune'] == 'head' else 'all'} ({trained}), {x['epochs']} epochs, "
        f"seed {x['seed']}"
    )
    metrics.plot_bars(results, out / "ablation.png", title=title)
