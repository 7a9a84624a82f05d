"""Typed configs, one per concern. YAML is only their file format: a run directory's ``config.yaml``.

A leaf module: standard library and yaml only, so configs load without torch. The names of the real choices (towers,
poolings, fusion heads) live here; ``towers`` and ``fusion`` register their implementations against them.

Defaults that depend on other settings (``--tune``'s epochs and rates, a packaged tower's pooling) stay ``None`` in
what the user asked, and ``resolve`` fills them in one place. A run's ``config.yaml`` holds the resolved values and,
under ``asked``, which keys the user set, so ``--config RUN/config.yaml --tune head`` re-derives the rest.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from mmfuse.errors import MmfuseError
from mmfuse.parsing import check_type, parse_class_weight, parse_duration, parse_threshold, tabular_kind

log = logging.getLogger(__name__)
MODALITIES = ("image", "text")
# A model's inputs may also include tabular columns (``--tabular-columns``), a third input to the fusion head.
INPUTS = (*MODALITIES, "tabular")
POOLINGS = ("cls", "mean")
# Text towers may also hand their token states to a pooling learned with the head (pooling.AttentionPool).
TEXT_POOLINGS = (*POOLINGS, "attention")
# linear: logistic regression on each modality's L2-normalised features; the ensemble's probes set its weights from
# scikit-learn's fit (training.portfolio).
FUSION_HEADS = ("attention", "concat", "gated", "linear")
# The packaged offline towers (towers.py registers a builder for each), with the defaults they bring.
# minilm: its token states pooled by a learned attention beat its own mean pooling by 0.01-0.02 weighted F1 on the
#     emoji data, and averaging its last two layers gained 0.012 over its last alone (5-fold CV, bench/RESULTS.md).
PACKAGED_TOWERS = {
    "efficientnet-lite0": {"modality": "image", "image_size": 224},
    "efficientnet-lite2": {"modality": "image", "image_size": 260},
    "minilm": {"modality": "text", "text_pooling": "attention", "text_layer_mean": 2},
    # all-mpnet-base-v2 (the mmfuse[mpnet] extra): the mean pooling it was trained with.
    "mpnet": {"modality": "text", "text_pooling": "mean"},
}
# The captioners (mmfuse.captioning), named here so that `mmfuse caption --help` lists them without importing torch;
# the registry in captioners.py builds exactly these (tests/test_startup.py checks it).
DEFAULT_CAPTIONER = "nlpconnect/vit-gpt2-image-captioning"
PACKAGED_CAPTIONERS = ("imagenet-tags", "imagenet-tags-lite2")
# What runs frozen towers (models.towers.onnx_engine): auto (onnxruntime on a CPU, torch on a GPU), torch or onnx.
TOWER_BACKENDS = ("auto", "torch", "onnx")
QUANTIZE = ("none", "int8")  # the frozen text tower's precision in onnxruntime (onnx_engine.quantized)
DTYPES = ("auto", "fp32", "autocast", "bf16")  # how a loaded model predicts: predict.Predictor says which is which
# Rows predict holds at a time (mmfuse.inference.stream): a few GPU batches; ~0.6 GB of 224-px pixels for a tuned
# vision tower
PREDICT_CHUNK = 4096
TUNES = ("head", "text", "image", "all")
AUGMENTS = ("none", "light", "strong")  # augment.py says what each does
# What --metric can optimise; metrics.py registers a function (labels, probabilities -> score) against each name.
METRICS = ("weighted_f1", "macro_f1", "accuracy", "log_loss", "roc_auc", "pr_auc", "micro_f1", "map")
BINARY_METRICS = ("roc_auc", "pr_auc")  # two classes only; a binary run's --metric defaults to roc_auc
# Multi-label only; a multi-label run's --metric defaults to micro_f1. The others but BINARY_METRICS score it too
# (accuracy: the exact-set match, F1s over its labels at a threshold of 0.5, log_loss: the binary cross-entropy).
MULTILABEL_METRICS = ("micro_f1", "map")
MAX_IMAGE_SIZE = 1024
# Accelerate's trackers, by the name --track takes, with the module each needs.
TRACKERS = {
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "wandb": "wandb",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
}
# Per --tune: epochs, batch size, learning rate (towers, or the head alone), head learning rate.
# head: on the emoji data 15 epochs at batch 64 and 2e-3 scored at least as well as 40 at batch 16 and 1e-3, in an
#     eighth of the optimizer steps. text: 5-fold cross-validation on the emoji data (bench/RESULTS.md); the head
#     starts from scratch, so it keeps the head's rate while MiniLM moves gently. image, all: the reference's.
TUNE_DEFAULTS = {
    "head": (15, 64, 2e-3, None),
    "text": (4, 32, 5e-5, 2e-3),
    "image": (8, 16, 1e-4, None),
    "all": (8, 16, 1e-4, None),
}
# --tune text with --lora: the adapters start at zero and hold few weights, so they want a higher rate than full
# tuning's; ten times its 5e-5 is the usual choice, not yet tuned here (bench/RESULTS.md has the one measurement).
LORA_LR = 5e-4
PRESETS = {
    # Frozen towers and a head on their cached features: seconds on a CPU (emoji 5-fold CV, seeds 0-1: 0.914 ± 0.009).
    "fast": {"train": {"tune": "head"}},
    # Top quality on a longer budget: the default's portfolio plus MiniLM fine-tuned beside frozen image features,
    # itself bagged (minutes per thousand rows on 2 cores), with mpnet's heads (the mmfuse[mpnet] extra, required).
    "best": {"train": {"ensemble": True, "tune": "text", "bag": 5}},
    # train's default (see default_preset): a portfolio of bagged members on frozen features (logistic-regression
    # probes, single-modality and fusion heads, mpnet's heads when the extra is installed) and a weighted ensemble of
    # them chosen greedily on their out-of-fold predictions (training.portfolio).
    "ensemble": {"train": {"ensemble": True, "tune": "head", "bag": 5}},
    # The reference design: ViT-B/16 (in21k) + RoBERTa-base cut to 8 layers, CLS pooling on both.
    "seed": {
        "model": {
            "vision": "google/vit-base-patch16-224-in21k",
            "text": "roberta-base",
            "text_layers": 8,
            "vision_pooling": "cls",
            "text_pooling": "cls",
        }
    },
}
# Flags that describe one model. Without --preset or --config, train fits the ensemble unless one of them is given:
# then it trains that one model (or bag) as asked.
SINGLE_MODEL = {"train": ("tune", "bag", "refit_full", "lora", "ensemble"), "model": ("fusion",)}


def default_preset(preset: str | None, asked: dict[str, list[str]] | dict[str, set[str]]) -> str | None:
    """The preset ``mmfuse train`` uses: the one named, else ``ensemble`` unless ``asked`` (per section, the keys the
    flags set) holds a flag that describes one model."""
    if preset:
        return preset
    one_model = any(set(asked.get(sec, ())) & set(keys) for sec, keys in SINGLE_MODEL.items())
    return None if one_model else "ensemble"


@dataclass
class DataConfig:
    train: str | None = None
    """Training data: a folder ROOT/<label>/<images> or a .csv/.jsonl/.parquet manifest."""
    val: str | None = None
    """Validation data in the same forms; without it, a stratified slice of train is held out."""
    captions: str | None = None
    """For folder data: a CSV with columns image,text (image relative to the folder, or a unique file name)."""
    val_captions: str | None = None
    """Captions CSV for a folder given as --val (defaults to --captions)."""
    val_split: float = 0.15
    """Fraction of train held out for validation when no --val is given."""
    skip_bad: bool = False
    """Skip bad rows (recorded in RUN/skipped.csv) instead of stopping with an error that lists them."""
    caption_missing: str | None = None
    """Captioner for rows without text (e.g. imagenet-tags); captions are cached in the run."""
    num_workers: int = 0
    """DataLoader worker processes for image decoding when towers are tuned (0: in the main process)."""
    decode_each_epoch: bool = False
    """With --tune all, decode images every epoch instead of once into a uint8 cache ($MMFUSE_HOME/pixels)
    (towers whose preprocessing crops or pads always decode every epoch)."""
    multi_label: bool = False
    """Multi-label: each row a set of labels (a sigmoid per label, thresholds tuned on held-out rows). A labels column
    (cat|dog, or lists in JSONL and parquet) makes a run multi-label by itself; this forces it for a label column."""
    label_sep: str | None = None
    """Split the label column's cells into sets on this (e.g. ';'), making the run multi-label (labels: on |)."""

    def __post_init__(self):
        if not 0.0 < self.val_split < 0.9:
            raise MmfuseError(f"--val-split must be between 0 and 0.9, got {self.val_split}")
        if self.label_sep is not None and not self.label_sep.strip():
            raise MmfuseError(f"--label-sep must be a character such as '|' or ';', got {self.label_sep!r}")
        if self.num_workers < 0:
            raise MmfuseError("--num-workers must be >= 0")


@dataclass
class ModelConfig:
    vision: str = "efficientnet-lite0"
    """Vision tower: a packaged name (efficientnet-lite0, efficientnet-lite2), a hub id or a local directory."""
    text: str = "minilm"
    """Text tower: minilm (packaged), a hub id or a local directory."""
    vision_pooling: str = "cls"
    """cls (CLS token, or the model's pooler for CNNs) or mean."""
    image_size: int | None = None
    """Input size in pixels for the packaged CNN towers (default: their native 224 for lite0, 260 for lite2);
    smaller is faster and suits small images such as icons. Hugging Face towers use their processor's size."""
    text_pooling: str | None = None
    """cls, mean, or attention (a learned pooling over token states, trained with the head); default attention
    for minilm, cls otherwise."""
    text_layers: int | None = None
    """Keep only the first N encoder layers of the text tower (the reference keeps 8 of RoBERTa's 12)."""
    text_layer_mean: int | None = None
    """Average the token states of the text tower's last N layers before pooling; default 2 for minilm (over 5-fold
    cross-validation on the emoji data, +0.012 weighted F1 over its last layer alone), 1 otherwise."""
    max_length: int = 128
    """Maximum text length in tokens."""
    fusion: str = "concat"
    """Fusion head: concat (the reference), gated or attention."""
    hidden: int = 256
    """Width of the head's hidden layer."""
    dropout: float = 0.5
    """Dropout before the classifier layer."""
    input_dropout: float = 0.2
    """Dropout on each modality's normalised features as they enter the fusion head."""
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    """Which modalities the model uses: image, text or both, and tabular (the ablation trains each)."""
    image_columns: list[str] = field(default_factory=list)
    """Manifest columns that each hold an image (e.g. image_front image_back), each through the one vision tower;
    default: the column image. A cell may be empty."""
    text_columns: list[str] = field(default_factory=list)
    """Manifest columns that each hold a text (e.g. title description), each through the one text tower; default: the
    column text. A cell may be empty."""
    tabular_columns: list[str] = field(default_factory=list)
    """Manifest columns of numbers (standardised, with a missing-value indicator) or categories (embedded), a third
    input to the fusion head; each kind is inferred from the training rows, or forced as name:num or name:cat."""
    modality_dropout: float = 0.0
    """Probability of blanking one modality per training sample, so the model copes when one is missing."""
    trust_remote_code: bool = False
    """Allow hub models that ship their own code. Off unless asked: it runs code from the model repository."""
    backend: str = "auto"
    """What runs the frozen towers (the embedding pass, and inputs predict finds in no cache): auto (onnxruntime on a
    CPU where it is installed, each tower exported to ONNX once, by the first pass of 256+ images or 2,000+ texts,
    and checked against torch; torch on a GPU), torch, or onnx (onnxruntime or an error). Features from either agree
    within 1e-4 and share one cache."""
    quantize: str = "none"
    """int8: the frozen text tower runs in onnxruntime, its matrix multiplications quantised (onnx_engine): faster on
    a CPU, features cached apart, and a run trained so predicts so. Refused for a tower whose CV weighted F1 fell by
    over 0.005 (bench/RESULTS.md). Image towers stay float32."""

    def __post_init__(self):
        if self.vision_pooling not in POOLINGS:
            raise MmfuseError(f"--vision-pooling must be one of {POOLINGS}, got {self.vision_pooling!r}")
        if self.text_pooling and self.text_pooling not in TEXT_POOLINGS:
            raise MmfuseError(f"--text-pooling must be one of {TEXT_POOLINGS}, got {self.text_pooling!r}")
        if self.fusion not in FUSION_HEADS:
            raise MmfuseError(f"--fusion must be one of {list(FUSION_HEADS)}, got {self.fusion!r}")
        if not self.modalities or any(m not in INPUTS for m in self.modalities):
            raise MmfuseError(f"--modalities must be image, text or both (or tabular), got {self.modalities}")
        if "tabular" in self.modalities and not self.tabular_columns:
            raise MmfuseError("--modalities tabular needs the columns: pass --tabular-columns NAME [NAME ...]")
        self._check_columns()
        if len(set(self.modalities)) != len(self.modalities):  # a repeat would feed one tower's features twice
            raise MmfuseError(f"--modalities names a modality twice: {self.modalities}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise MmfuseError("--modality-dropout must be in [0, 1)")
        if self.modality_dropout > 0 and len(self.modalities) < 2:
            # Nothing would be blanked in training, yet a text-only model would then accept rows without text and
            # answer from an untrained placeholder.
            raise MmfuseError(
                f"--modality-dropout blanks one of two modalities; with --modalities {self.modalities[0]} alone it "
                "cannot: leave it out (or set it to 0)."
            )
        if self.text_layers is not None and self.text_layers < 1:
            raise MmfuseError("--text-layers must be >= 1")
        if self.text_layer_mean is not None and self.text_layer_mean < 1:
            raise MmfuseError("--text-layer-mean must be >= 1")
        # Above 1024 px a batch of images alone takes gigabytes (5000 px exhausted 128 GB of memory); the packaged
        # towers were trained at 224-260.
        if self.image_size is not None and not 32 <= self.image_size <= MAX_IMAGE_SIZE:
            raise MmfuseError(f"--image-size must be between 32 and {MAX_IMAGE_SIZE} pixels, got {self.image_size}")
        if self.hidden < 1:
            raise MmfuseError(f"--hidden must be >= 1, got {self.hidden}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.input_dropout < 1.0):
            raise MmfuseError("--dropout and --input-dropout must be in [0, 1)")
        if self.max_length < 2:
            raise MmfuseError("--max-length must be >= 2")
        if self.backend not in TOWER_BACKENDS:
            raise MmfuseError(f"--backend must be one of {list(TOWER_BACKENDS)}, got {self.backend!r}")
        if self.quantize not in QUANTIZE:
            raise MmfuseError(f"--quantize must be one of {list(QUANTIZE)}, got {self.quantize!r}")
        if self.quantize != "none" and self.backend == "torch":
            raise MmfuseError(
                f"--quantize {self.quantize} runs the text tower in onnxruntime, and --backend torch keeps it in "
                "torch: leave one of them out."
            )

    def _check_columns(self) -> None:
        named = [*self.image_columns, *self.text_columns, *(tabular_kind(c)[0] for c in self.tabular_columns)]
        if any(not c.strip() for c in named):
            raise MmfuseError("--image-columns, --text-columns and --tabular-columns take non-empty column names")
        if twice := sorted({c for c in named if named.count(c) > 1}):
            raise MmfuseError(f"column(s) {twice} are named twice among --image/--text/--tabular-columns")
        if "label" in named:
            raise MmfuseError("label is the target column; it cannot also be an input column")

    @property
    def columns(self) -> bool:
        """Whether the model reads named columns rather than one image and one text."""
        return bool(self.image_columns or self.text_columns or self.tabular_columns)


@dataclass
class TrainConfig:
    tune: str = "text"
    """text or image: fine-tune that tower, the other frozen with its features cached; head: both frozen, only the
    head trains (seconds on CPU); all: both tuned (the reference; wants a GPU). Given alone, it trains one model
    (train's default is the ensemble). text fine-tunes MiniLM (about 100 s per 1,300 rows on 2 cores; 5-fold CV on
    the emoji: +0.010-0.015 weighted F1 over a probe on frozen features)."""
    epochs: int | None = None
    """Epochs; default 15 with --tune head (each epoch costs milliseconds), 4 with --tune text, 8 with --tune image
    or all (the reference)."""
    batch_size: int | None = None
    """Batch size per process; default 64 with --tune head (cached features: larger batches train the head in a
    fraction of the steps), 32 with --tune text, 16 with --tune image or all (the reference; on a GPU 128-256 keeps it
    busy)."""
    grad_accum: int = 1
    """Accumulate gradients over this many batches per optimizer step (a large effective batch in little memory)."""
    lr: float | None = None
    """Peak learning rate of the tuned towers and, unless --head-lr is given, the head; default 2e-3 for a head on
    frozen features, 5e-5 with --tune text (5e-4 with --lora), 1e-4 with --tune image or all (the reference)."""
    head_lr: float | None = None
    """Peak learning rate of the head (and the attention pooling) when towers are tuned; default 2e-3 with --tune text,
    --lr otherwise."""
    tune_layers: int | None = None
    """With --tune text, image or all: fine-tune only the last N encoder layers of each tuned tower (and what
    follows them); the embeddings and the layers below stay frozen. Default: the whole tower."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of steps spent warming the learning rate up, before cosine decay."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing (0: none)."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 turns clipping off)."""
    keep: str = "best"
    """Which epoch's weights to keep: best (the best validation --metric, ties to the lower loss) or last."""
    seed: int = 0
    """Seed for the split, initialisation and shuffling."""
    mixed_precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), no, bf16 or fp16."""
    compile: bool = False
    """torch.compile each encoder layer of the tuned towers (GPU; on an H200 +27% --tune all throughput after a
    12 s compile, which short jobs do not win back)."""
    track: list[str] = field(default_factory=list)
    """Experiment trackers to log the config and each epoch's metrics to, through Accelerate: tensorboard (files under
    RUN/tracking/), mlflow (a local ./mlruns unless MLFLOW_TRACKING_URI says otherwise), wandb... None by default:
    nothing leaves the machine unless asked. Every run writes RUN/metrics.jsonl, a line per epoch, regardless."""
    checkpoint_every: int | None = None
    """Also write a checkpoint every N optimizer steps (one is always written after each epoch, and at least every
    10 minutes), so --resume continues a killed run from there."""
    keep_checkpoints: bool = False
    """Keep RUN/checkpoints/ once the run has finished (by default they are deleted then)."""
    bag: int = 1
    """k-fold bagging: train K models, each validated on its own fold of DATA, and predict with their average;
    every row gets one out-of-fold prediction, the honest validation estimate (1: a single model)."""
    bag_groups: str | None = None
    """With --bag: a manifest column whose rows must stay in one fold (e.g. the same source image or product)."""
    refit_full: bool = False
    """With --bag: also train one model on every row for the members' median best epoch; predict then uses it."""
    augment: str | None = None
    """Training image augmentation while the vision tower is tuned, on each batch: none; light (a random resized crop
    of 70-100% of the area, a horizontal flip, brightness/contrast/saturation jitter of ±0.1); strong (35-100%,
    ±0.25). Default light with --tune image or all, none otherwise (a frozen tower's features are cached: nothing to
    augment)."""
    hflip: bool = True
    """With --augment light or strong, flip images left-right half the time; --no-hflip for data where left and
    right matter (text in images, digits, arrows...)."""
    lora: int = 0
    """With --tune text: train LoRA adapters of this rank in the text tower's attention (the mmfuse[lora] extra)
    instead of all its weights; the run then stores only the adapters beside the base tower (0: off)."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (the adapters' output is scaled by alpha / rank); default twice --lora."""
    ensemble: bool = False
    """Train a portfolio of --bag K bagged members and predict with a weighted ensemble of them, chosen greedily on
    their out-of-fold predictions. train's default (--preset ensemble) unless a flag describes one model (--tune,
    --fusion, --bag, --refit-full, --lora) or --config is given; with --tune text (--preset best) fine-tuned members
    join the frozen ones."""
    time_limit: str | None = None
    """With --preset ensemble: stop starting members once the next one's expected time would pass this budget (e.g.
    90s, 5m, 1h30m); the probes always run, so the run ends with a usable ensemble."""
    calibrate: bool = False
    """Fit a temperature (one scalar T) to the validation rows, or a bag's or ensemble's out-of-fold rows, so that the
    probabilities predict, evaluate and serve give match how often they are right; RUN/calibration.json holds T and
    metrics.json the calibration error (ECE) before and after."""
    class_weight: str | None = None
    """Weigh each class in the cross-entropy loss: balanced (n / (classes * count), counted on the training rows) or
    per class, as cat=2,dog=0.5 (classes not named weigh 1). Default: every row weighs the same."""
    balanced_sampling: bool = False
    """Draw training rows with replacement in inverse proportion to their class's count, as many each epoch as there
    are rows, so every class is seen about equally often."""
    metric: str = "weighted_f1"
    """What to optimise: the kept epoch, the ensemble's greedy selection, a search's objective and a bag's headline
    score: weighted_f1, macro_f1 (every class counts the same: imbalanced data), accuracy, log_loss (ties in the
    others go to the lower log loss), for two classes roc_auc or pr_auc, for multi-label runs micro_f1 or map (mean
    average precision over the labels). Default: roc_auc for two classes, micro_f1 for multi-label, weighted_f1
    otherwise."""
    positive: str | None = None
    """With two classes: the label of the positive class, whose probability the threshold cuts and whose F1, ROC and
    precision-recall curves are reported. Default: the minority class (on a tie, the second in sorted order)."""
    threshold: str = "auto"
    """With two classes: predict the positive class when its probability reaches this; auto chooses the one
    maximising the positive class's F1 on the validation (or out-of-fold) probabilities; or a number in (0, 1)."""

    def __post_init__(self):
        if self.tune not in TUNES:
            raise MmfuseError(f"--tune must be one of {TUNES}, got {self.tune!r}")
        # None: resolved from --tune by ``resolve``.
        if (self.epochs is not None and self.epochs < 1) or (self.batch_size is not None and self.batch_size < 1):
            raise MmfuseError("--epochs, --batch-size and --grad-accum must be >= 1, and --lr a finite number > 0")
        if self.grad_accum < 1 or (self.lr is not None and not 0 < self.lr < math.inf):
            raise MmfuseError("--epochs, --batch-size and --grad-accum must be >= 1, and --lr a finite number > 0")
        if self.tune_layers is not None and self.tune_layers < 1:
            raise MmfuseError(f"--tune-layers must be >= 1, got {self.tune_layers}")
        if self.tune_layers is not None and self.tune == "head":
            raise MmfuseError("--tune-layers applies to tuned towers: pass --tune text, image or all with it")
        if self.head_lr is not None and not 0 < self.head_lr < math.inf:
            raise MmfuseError(f"--head-lr must be a finite number > 0, got {self.head_lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise MmfuseError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.keep not in ("best", "last"):
            raise MmfuseError(f"--keep must be best or last, got {self.keep!r}")
        if not 0 <= self.seed < 2**32:  # numpy's seeding takes no more
            raise MmfuseError(f"--seed must be between 0 and 2**32 - 1, got {self.seed}")
        # NaN fails each of these comparisons; a NaN --grad-clip would otherwise turn clipping off without a word.
        if not 0.0 <= self.weight_decay < math.inf:
            raise MmfuseError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise MmfuseError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.grad_clip < math.inf:
            raise MmfuseError(f"--grad-clip must be a finite number >= 0 (0 turns clipping off), got {self.grad_clip}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise MmfuseError("--mixed-precision must be auto, no, bf16 or fp16")
        unknown = [t for t in self.track if t not in TRACKERS]
        if unknown:
            raise MmfuseError(f"--track {' '.join(unknown)}: the trackers are {', '.join(TRACKERS)}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise MmfuseError(f"--checkpoint-every must be >= 1 step, got {self.checkpoint_every}")
        if self.bag < 1:
            raise MmfuseError(f"--bag must be 2 or more (1: no bagging), got {self.bag}")
        if (self.bag_groups or self.refit_full) and self.bag < 2:
            raise MmfuseError("--bag-groups and --refit-full go with --bag K (K >= 2)")
        if self.augment is not None and self.augment not in AUGMENTS:
            raise MmfuseError(f"--augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if self.lora < 0:
            raise MmfuseError(f"--lora is the adapters' rank, >= 1 (0: off), got {self.lora}")
        if self.lora and self.tune != "text":
            # With --tune all one learning rate would serve both the adapters and the fully tuned vision tower.
            raise MmfuseError(
                f"--lora adapts a fine-tuned text tower, and --tune {self.tune} tunes "
                + {"head": "no tower", "image": "the image tower", "all": "both towers"}[self.tune]
                + ": pass --tune text with it, or leave --lora out (--lora 0)."
            )
        if self.ensemble and self.bag < 2:
            raise MmfuseError(
                f"--preset ensemble weighs its members on their out-of-fold predictions, which --bag {self.bag} does "
                "not give: pass --bag K with K >= 2 (the preset's default is 5)."
            )
        if self.time_limit is not None:
            if not self.ensemble:
                raise MmfuseError("--time-limit budgets an ensemble's members: pass it with --preset ensemble.")
            parse_duration(self.time_limit)
        if self.class_weight is not None:
            parse_class_weight(self.class_weight)
        if self.metric not in METRICS:
            raise MmfuseError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        parse_threshold(self.threshold)
        if self.lora_alpha is not None and not (self.lora and 0 < self.lora_alpha < math.inf):
            raise MmfuseError(
                f"--lora-alpha must be a finite number > 0 and goes with --lora RANK, got {self.lora_alpha}"
            )


SECTIONS = ("data", "model", "train")
# Defaults that follow another setting: when that setting changes and the user did not set the key, it is re-derived.
DEPENDS_ON = {
    "epochs": "tune",
    "batch_size": "tune",
    "lr": ("tune", "lora"),
    "lora_alpha": "lora",
    "head_lr": "tune",
    "augment": "tune",
    "text_pooling": "text",
    "text_layer_mean": "text",
    "image_size": "vision",
}


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    asked: dict[str, list[str]] = field(default_factory=dict)
    """Per section, the keys the user set (flags, a preset or a config file); the rest are defaults."""

    @property
    def tuned(self) -> list[str]:
        """The modalities whose towers are fine-tuned; the others' features are computed once and cached."""
        tune = self.train.tune
        return [m for m in self.model.modalities if m in MODALITIES and (tune == "all" or tune == m)]

    def updated(self, changes: dict[str, dict]) -> RunConfig:
        """This config with ``changes`` ({section: {key: value}}) applied and recorded as asked. A default that
        follows a changed setting (``DEPENDS_ON``: --tune's epochs and rates, a text tower's pooling) and was not
        asked for is reset, so ``resolve`` derives it again for the new setting."""
        asked = {sec: set(self.asked.get(sec, ())) | set(changes.get(sec, {})) for sec in SECTIONS}
        parts = {}
        for sec in SECTIONS:
            values = {**vars(getattr(self, sec)), **changes.get(sec, {})}
            old = vars(getattr(self, sec))
            for key, drivers in DEPENDS_ON.items():
                drivers = (drivers,) if isinstance(drivers, str) else drivers
                if key in values and key not in asked[sec] and any(values[d] != old[d] for d in drivers):
                    values[key] = None
            changed_to_head = values.get("tune") == "head" != self.train.tune
            if sec == "train" and changed_to_head and "tune_layers" not in changes.get(sec, {}):
                values["tune_layers"] = None  # a config's tune_layers meant its tuned towers; --tune head tunes none
            if sec == "train" and changed_to_head and "lora" not in changes.get(sec, {}):
                values["lora"], values["lora_alpha"] = 0, None  # and its adapters, a tuned text tower's
            parts[sec] = type(getattr(self, sec))(**values)
        return RunConfig(**parts, asked={sec: sorted(keys) for sec, keys in asked.items() if keys})

    def to_yaml(self, path: Path) -> None:
        """Writes the config with its data paths absolute, so ``--config`` reproduces the run from any folder."""
        raw = asdict(self)
        for key in ("train", "val", "captions", "val_captions"):
            if raw["data"][key]:
                raw["data"][key] = str(Path(raw["data"][key]).expanduser().absolute())
        path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))

    @classmethod
    def from_yaml(cls, path: Path) -> RunConfig:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise MmfuseError(f"Config file not found: {path}") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise MmfuseError(f"{path} is not a readable YAML config: {e}") from None
        if not isinstance(raw, dict):
            raise MmfuseError(f"{path} is not an mmfuse config: expected sections data, model and train")
        unknown = set(raw) - {*SECTIONS, "asked"}
        if unknown:  # e.g. "training:" for "train:": its settings would otherwise be ignored without a word
            raise MmfuseError(
                f"{path}: unknown sections {sorted(map(str, unknown))}; the sections are {list(SECTIONS)}"
            )
        parts = {}
        for f in fields(cls):
            if f.name not in SECTIONS:
                continue
            sub = raw.get(f.name) or {}
            if not isinstance(sub, dict):
                raise MmfuseError(f"{path}: '{f.name}' must be a mapping of settings (key: value), got {sub!r}")
            part_fields = {x.name: x for x in fields(f.default_factory())}
            unknown = set(sub) - set(part_fields)
            if unknown:
                raise MmfuseError(f"{path}: unknown keys in '{f.name}': {sorted(map(str, unknown))}")
            if f.name == "train" and type(sub.get("threshold")) in (int, float):
                sub["threshold"] = str(sub["threshold"])  # text (auto or a number): threshold: 0.3 means the number
            for key, value in sub.items():
                check_type(path, f"{f.name}.{key}", value, str(part_fields[key].type))
            try:
                parts[f.name] = type(f.default_factory())(**sub)
            except MmfuseError as e:  # the checks name flags: say which file the value came from
                raise MmfuseError(f"{path}: {e}") from None
        asked = raw.get("asked")
        if not isinstance(asked, dict):  # a hand-written config: everything in it was asked for
            asked = {sec: list(raw.get(sec) or {}) for sec in SECTIONS}
        return cls(**parts, asked={sec: [str(k) for k in keys or ()] for sec, keys in asked.items()})


def resolve(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` with every default that depends on other settings filled in: the one place they are
    derived (``--tune``'s epochs, batch size and rates; a packaged tower's pooling, layer averaging and size)."""
    cfg = copy.deepcopy(cfg)
    t, m = cfg.train, cfg.model
    if t.lora and "text" not in m.modalities:
        raise MmfuseError(
            f"--lora adapts the text tower, which --modalities {m.modalities[0]} leaves out: leave --lora out."
        )
    if m.quantize != "none" and t.tune in ("text", "all") and "text" in m.modalities:
        raise MmfuseError(
            f"--quantize {m.quantize} runs a frozen text tower in int8, and --tune {t.tune} fine-tunes it: pass "
            "--tune head (or image), or leave --quantize out."
        )
    if t.tune in ("text", "image") and t.tune not in m.modalities:
        # Nothing would be tuned: a head alone, with the epochs and rates chosen for a tower.
        alone = " ".join(m.modalities)
        if "tune" in cfg.asked.get("train", ()):
            raise MmfuseError(
                f"--tune {t.tune} fine-tunes the {t.tune} tower, which --modalities {alone} leaves out: pass "
                f"--tune head (a head on frozen features) or --tune {alone}."
            )
        log.warning(
            "--modalities %s has no %s tower for --tune %s to fine-tune: training with --tune head",
            alone,
            t.tune,
            t.tune,
        )
        cfg = cfg.updated({"train": {"tune": "head"}})
        cfg.asked["train"].remove("tune")
        t, m = cfg.train, cfg.model
    epochs, batch_size, lr, head_lr = TUNE_DEFAULTS[t.tune]
    t.epochs = epochs if t.epochs is None else t.epochs
    t.batch_size = batch_size if t.batch_size is None else t.batch_size
    t.lr = (LORA_LR if t.lora else lr) if t.lr is None else t.lr
    t.lora_alpha = 2.0 * t.lora if t.lora and t.lora_alpha is None else t.lora_alpha
    t.head_lr = (head_lr or t.lr) if t.head_lr is None else t.head_lr
    image_tuned = "image" in cfg.tuned
    if t.augment not in (None, "none") and not image_tuned:
        # Without a vision tower (a text-only run of an ablation) there is nothing to refuse.
        if "augment" in cfg.asked.get("train", ()) and "image" in m.modalities:
            raise MmfuseError(
                f"--augment {t.augment} changes training images on their way into a tuned vision tower; with --tune "
                f"{t.tune} the image features are computed once and cached, so nothing can be augmented. Pass --tune "
                "image or all with it, or leave --augment out."
            )
        t.augment = None  # a default that followed an earlier --tune
    if t.augment is None:
        t.augment = "light" if image_tuned else "none"
    if m.image_size is None:
        m.image_size = PACKAGED_TOWERS.get(m.vision, {}).get("image_size")
    if m.tabular_columns and "tabular" not in m.modalities and "modalities" not in cfg.asked.get("model", ()):
        m.modalities.append("tabular")  # the columns asked for are an input unless --modalities leaves them out
    text = PACKAGED_TOWERS.get(m.text, {})
    m.text_pooling = m.text_pooling or text.get("text_pooling", "cls")
    if m.text_layer_mean is None:
        m.text_layer_mean = min(text.get("text_layer_mean", 1), m.text_layers or math.inf)
    return cfg
