"""The CPU engine for frozen towers: each tower's forward exported once to ONNX and run in onnxruntime.

    mmfuse train data.csv --out runs/r                     # backend auto: onnxruntime for frozen towers on a CPU
    mmfuse train data.csv --out runs/r --backend torch     # opt out: torch runs every tower
    python -c "from mmfuse.models.towers import build_text; from mmfuse.models.towers.onnx_engine import engine; \
        t = build_text('minilm'); t.freeze(); print(engine(t, 'onnx', 'cpu'))"

``engine(tower, backend, device)`` gives what runs a frozen tower's forward: the tower itself (torch), or an
``OnnxTower`` called the same way, with the batch the tower's ``preprocess`` made, giving the same features within
``TOLERANCE``. The export lives in ``$MMFUSE_HOME/onnx-towers/<tower fingerprint>/`` (the feature cache's key, so
features from either backend share one cache), written once: under a file lock, so concurrent processes export it
once, to a temporary file renamed into place, so a half-written file is never read, and with its sha256 in
``tower.json`` (written last), so a damaged file is exported again. Before it is kept, the export is checked against
torch on fixed batches of two shapes; one that differs by more than ``TOLERANCE``, or that fails to export, is
refused with the reason (recorded, so it is not tried again with the same torch and onnxruntime), and the tower runs
in torch with a warning, or, where onnx was asked for explicitly, stops with an error.

onnxruntime comes with the extras ``mmfuse[cpu]`` and ``mmfuse[export]``: without it, ``auto`` quietly keeps torch. GPUs
keep torch.

A text tower built with ``--quantize int8`` (its spec says ``quantize``) runs ``int8.onnx``: the float32 export above,
its matrix multiplications with constant weights quantised dynamically (``int8.quantize``: weights per channel,
activations per row, so a text's features do not depend on its batch mates), kept beside it once its features agree
with the float32 ones (cosine at least ``INT8_MIN_COSINE`` on every parity item). It never falls back to torch: the
run's head was trained on int8 features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image
from torch import nn

from mmfuse.config import TOWER_BACKENDS
from mmfuse.errors import MmfuseError
from mmfuse.models.towers import int8
from mmfuse.models.towers.base import Tower, TowerCard
from mmfuse.paths import mmfuse_home

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
"""The largest absolute difference from torch's features an export may show on the parity batches."""
INSTALL = "pip install 'mmfuse[export]'"
FOLDER = "onnx-towers"
VERSION = 1
"""Bumped when what is exported changes, so older exports are made again."""
PARITY_TEXTS = (
    "a grinning cat face",
    "two dogs play in the park on a sunny afternoon, chasing a red ball across the wet grass",
    "x",
)
AUTO_EXPORT_ITEMS = {"image": 256, "text": 2000}
"""Under auto, a tower with no export yet is exported only for a pass of at least this many inputs of its modality:
the export and its parity check cost 20-40 s once on 2 cores (measured at load 7: Lite0 24 s, MiniLM 20 s, mpnet
41 s), which a pass must win back. onnxruntime runs Lite0 about 5x torch's speed, so 256 images pay for it; the text
towers only 1.2-1.6x (bench/cpu.py), so a pass of 500 short texts (the default ensemble on 500 rows, cold) would lose
time to the export. Smaller passes use an export already made, or torch."""
INT8_MIN_COSINE = 0.95
"""The least cosine similarity between an int8 export's features and the float32 ones, per parity item (a pooled
vector, or each real token's state), for the int8 export to be kept. With activations per row, MiniLM's token states
measure 0.994 and mpnet's 0.994 (mean-pooled 0.995); per tensor they measured 0.98 and 0.82, and per-tensor weights
with a reduced range 0.64: a floor that catches a broken quantisation, not a measure of quality (``INT8_MEASURED``)."""
INT8_MAX_LOSS = 0.005
"""The most weighted F1 a packaged text tower may lose in int8 for --quantize int8 to be allowed for it."""
INT8_MEASURED = {
    # The packaged towers' int8 (activations per row) against float32 in 5-fold x 5-seed CV of --preset fast on the
    # three visible sets (bench/RESULTS.md, "int8 text towers"): the largest fall of mean weighted F1 over the sets,
    # or why refused. MiniLM fell 0.003 on debian-apps and rose elsewhere; mpnet rose 0.001 to 0.005 on all three.
    "minilm": 0.003,
    "mpnet": 0.0,
}
_LOADED: dict[str, OnnxTower] = {}
"""Sessions already made in this process, by tower fingerprint: a bag's members and every batch share one."""
_REFUSED: dict[str, str] = {}
"""Towers whose export was refused, by fingerprint, with the reason: warned about once per process."""


class Refused(Exception):
    """An export that cannot be used, with the reason."""


def onnxruntime_module():
    """onnxruntime, or None where it is not installed (the optional extra ``mmfuse[export]``)."""
    try:
        import onnxruntime  # deferred: an optional extra, imported only where a tower runs in it
    except ImportError:
        return None
    return onnxruntime


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup (v2 ``cpu.max``, v1 ``cfs_quota_us``)
    quota, where a container's share is set, not by its mask, and ``os.cpu_count`` overcounts."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def _cgroup_quota() -> float | None:
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def resolve(backend: str, device: torch.device | str = "cpu") -> str:
    """torch or onnx: what runs frozen towers on ``device`` for the setting ``backend`` (``ModelConfig.backend``).

    Raises:
        MmfuseError: onnx asked for on a GPU, or without onnxruntime installed.
    """
    if backend not in TOWER_BACKENDS:
        raise MmfuseError(f"--backend must be one of {list(TOWER_BACKENDS)}, got {backend!r}")
    on_cpu = torch.device(device).type == "cpu"
    if backend == "torch" or (backend == "auto" and (not on_cpu or onnxruntime_module() is None)):
        return "torch"
    if not on_cpu:
        raise MmfuseError(
            f"--backend onnx runs frozen towers in onnxruntime on the CPU, and this runs on {device}: leave it out "
            "(auto keeps torch on a GPU) or pass --backend torch."
        )
    if onnxruntime_module() is None:
        raise MmfuseError(f"--backend onnx needs onnxruntime, which is not installed: {INSTALL}")
    return "onnx"


def engine(
    tower: Tower, backend: str = "auto", device: torch.device | str = "cpu", items: int | None = None
) -> Tower | OnnxTower:
    """What runs the frozen ``tower`` (built from its card: its weights are the ones its fingerprint names): itself,
    or its checked ONNX export in onnxruntime.

    ``items``: how many inputs the caller has for it; under auto, fewer than ``AUTO_EXPORT_ITEMS`` of its modality
    use an export only where one is already made (None: enough).

    A tower in another precision than float32 (a bf16 predictor's) stays in torch: its features are kept apart
    from float32 ones, and the export computes in float32.

    Raises:
        MmfuseError: ``backend`` is onnx and the export was refused.
    """
    int8 = getattr(tower, "quantize", None) == "int8"
    in_torch = resolve(backend, device) == "torch"
    fp32 = all(p.dtype == torch.float32 for p in tower.parameters())
    if int8 and (in_torch or not fp32):
        raise MmfuseError(
            f"this run's text tower runs in int8 (--quantize int8), in onnxruntime on a CPU in float32, and here it "
            f"would run in torch (device {device}, --backend {backend}, onnxruntime "
            f"{'installed' if onnxruntime_module() else f'not installed: {INSTALL}'}): predict on a CPU with "
            "onnxruntime, or train without --quantize."
        )
    if in_torch:
        return tower
    if not fp32:
        if backend == "onnx":
            raise MmfuseError("--backend onnx runs float32 towers; this one is not (pass --dtype fp32)")
        return tower
    fingerprint, name = tower.fingerprint, tower.spec()["name"]
    if fingerprint in _LOADED:
        return _LOADED[fingerprint]
    try:
        if fingerprint in _REFUSED:
            raise Refused(_REFUSED[fingerprint])
        few = backend == "auto" and not int8 and items is not None and items < AUTO_EXPORT_ITEMS[tower.modality]
        path = _checked(folder(tower)) if few else load_or_export(tower)
        if path is None:
            log.debug("the %s tower %s runs in torch: %d inputs do not pay for its export", tower.modality, name, items)
            return tower
        run = OnnxTower(tower, quantized(tower, path) if int8 else path)
    except (Refused, OSError) as e:
        if isinstance(e, OSError):  # a home that cannot be written (read-only, full): nothing is recorded there
            e = Refused(f"{folder(tower)} could not be written or read ({e})")
        if int8:  # no fallback: float32 features are not what the run's head was trained on
            raise MmfuseError(
                f"--quantize int8: the int8 export of the text tower {name} was refused: {e}. Train without --quantize."
            ) from None
        if backend == "onnx":
            raise MmfuseError(
                f"--backend onnx: the ONNX export of the {tower.modality} tower {name} was refused: {e}. Pass "
                "--backend torch (or leave --backend out: auto then runs it in torch)."
            ) from None
        if fingerprint not in _REFUSED:
            log.warning("the %s tower %s runs in torch: its ONNX export was refused (%s)", tower.modality, name, e)
        _REFUSED[fingerprint] = str(e)
        return tower
    _LOADED[fingerprint] = run
    return run


class OnnxTower:
    """A frozen tower's forward in onnxruntime: called with the batch its ``preprocess`` made, like the tower, and
    giving its features as a float32 CPU tensor."""

    def __init__(self, tower: Tower, path: Path):
        ort = onnxruntime_module()
        options = ort.SessionOptions()
        # One process, its cores: more threads than cores only contend (2 on a 2-core machine beat 4).
        options.intra_op_num_threads = available_cores()
        options.inter_op_num_threads = 1
        # Idle threads otherwise spin after each call, taking the cores from what runs between calls (the server's
        # request parsing and decoding, the next batch's tokenizing), as the exported runtime found (runtime.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.dtypes = {i.name: _NUMPY[i.type] for i in self.session.get_inputs()}
        self.modality, self.dim, self.sequence, self.path = tower.modality, tower.dim, tower.sequence, path

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        feed = {n: inputs[n].cpu().numpy().astype(self.dtypes[n], copy=False) for n in self.names}
        return torch.from_numpy(self.session.run(None, feed)[0])

    def __repr__(self) -> str:
        return f"OnnxTower({self.path})"


_NUMPY = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(uint8)": np.uint8, "tensor(int32)": np.int32}


def folder(tower: Tower) -> Path:
    """Where ``tower``'s export is kept: by its fingerprint, the feature cache's key, less ``quantize`` (an int8
    export is made from the float32 one and kept beside it)."""
    spec = {k: v for k, v in tower.spec().items() if k != "quantize"}
    return mmfuse_home() / FOLDER / TowerCard(tower.modality, spec, tower.dim, tower.sequence).fingerprint


def load_or_export(tower: Tower) -> Path:
    """The path of ``tower``'s checked export, exporting it first where there is none, or a damaged or stale one.

    Raises:
        Refused: the export failed, or differs from torch by more than ``TOLERANCE`` (now or when first tried).
    """
    where = folder(tower)
    found = _checked(where)
    if found is not None:
        return found
    where.mkdir(parents=True, exist_ok=True)
    with FileLock(str(where / ".lock")):
        found = _checked(where)  # another process may have written it while this one waited
        if found is not None:
            return found
        return _export(tower, where)


def _versions(stem: str = "tower") -> dict:
    versions = {"engine": VERSION, "torch": torch.__version__, "onnxruntime": onnxruntime_module().__version__}
    return versions | {"int8": int8.SCHEME} if stem == "int8" else versions  # an int8 made another way is redone


def int8_refusal(name: str) -> str | None:
    """Why --quantize int8 is refused for the packaged tower ``name`` (``INT8_MEASURED``); None where it is allowed,
    or not measured (any Hugging Face tower: only the cosine floor then checks it, when it is first quantised)."""
    measured = INT8_MEASURED.get(name)
    if isinstance(measured, str):
        return measured
    if measured is not None and measured > INT8_MAX_LOSS:
        return f"it lost {measured:.3f} weighted F1 in cross-validation, over the {INT8_MAX_LOSS} allowed"
    return None


def quantized(tower: Tower, source: Path) -> Path:
    """The path of the checked int8 export beside the float32 one at ``source``, quantising it first where there is
    none, or a damaged or stale one.

    Raises:
        Refused: quantisation failed, or its features fall below ``INT8_MIN_COSINE`` (now or when first tried).
    """
    where = source.parent
    found = _checked(where, "int8")
    if found is not None:
        return found
    with FileLock(str(where / ".lock")):
        found = _checked(where, "int8")
        if found is not None:
            return found
        return _quantize(tower, source, where)


def _quantize(tower: Tower, source: Path, where: Path) -> Path:
    name = tower.spec()["name"]
    log.info("quantising the ONNX export of the text tower %s to int8 once (%s)", name, where)
    fd, tmp = tempfile.mkstemp(prefix=".int8.", suffix=".onnx.tmp", dir=where)
    os.close(fd)
    tmp = Path(tmp)
    try:
        try:
            with _root_quiet():
                int8.quantize(source, tmp)
            agreement = cosine_agreement(tower, source, tmp, parity_batches(tower))
        except Exception as e:  # the quantiser's or the runtime's failure
            reason = f"quantisation failed ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})"
            _write_meta(where, {"status": "refused", "reason": reason}, "int8")
            raise Refused(reason) from None
        if not agreement >= INT8_MIN_COSINE:
            reason = f"its features agree with float32 at a cosine of {agreement:.3f}, under {INT8_MIN_COSINE}"
            _write_meta(where, {"status": "refused", "reason": reason, "min_cosine": float(agreement)}, "int8")
            raise Refused(reason)
        digest = _sha256(tmp)
        os.replace(tmp, where / "int8.onnx")
        _write_meta(where, {"status": "passed", "sha256": digest, "min_cosine": float(agreement)}, "int8")
    finally:
        tmp.unlink(missing_ok=True)
    log.info("the int8 export of %s agrees with float32 at a cosine of %.3f or more", name, agreement)
    return where / "int8.onnx"


@contextlib.contextmanager
def _root_quiet():
    """The quantiser logs "Please consider to run pre-processing before quantization" on the root logger: shape
    inference adds nothing to the dynamic quantisation of MatMuls with constant weights, and the line alarms."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def cosine_agreement(tower: Tower, reference: Path, path: Path, batches: list[dict[str, torch.Tensor]]) -> float:
    """The least cosine similarity, over ``batches``' items (their real tokens' states, for a tower of token
    states), between the features of the export at ``path`` and those of the one at ``reference``."""
    ref_run, run, worst = OnnxTower(tower, reference), OnnxTower(tower, path), 1.0
    for inputs in batches:
        ref, got = ref_run(**inputs), run(**inputs)
        if tower.sequence:
            keep = inputs["attention_mask"].bool()
            ref, got = ref[keep], got[keep]
        worst = min(worst, float(torch.nn.functional.cosine_similarity(ref, got, dim=-1).min()))
    return worst


def _checked(where: Path, stem: str = "tower") -> Path | None:
    """The export ``stem``.onnx in ``where`` if ``stem``.json vouches for it (same versions, same sha256); None if
    there is none or it is damaged (then it is made again).

    Raises:
        Refused: the same versions refused it before.
    """
    try:
        meta = json.loads((where / f"{stem}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("versions") != _versions(stem):
        return None
    if meta.get("status") == "refused":
        raise Refused(meta.get("reason", "refused"))
    path = where / f"{stem}.onnx"
    try:
        if meta.get("status") != "passed" or _sha256(path) != meta.get("sha256"):
            log.warning("the ONNX export in %s is damaged or incomplete: it is not used", where)
            return None
    except OSError:
        return None
    return path


def _export(tower: Tower, where: Path) -> Path:
    name = tower.spec()["name"]
    log.info("exporting the frozen %s tower %s to ONNX once (%s)", tower.modality, name, where)
    batches = parity_batches(tower)
    fd, tmp = tempfile.mkstemp(prefix=".tower.", suffix=".onnx.tmp", dir=where)
    os.close(fd)
    tmp = Path(tmp)
    try:
        try:
            _write_onnx(tower, batches[0], tmp)
            diff = parity(tower, tmp, batches)
        except Refused as e:
            _write_meta(where, {"status": "refused", "reason": str(e)})
            raise
        except Exception as e:  # any failure of the exporter or the runtime: the tower runs in torch instead
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else 'failed'}"
            _write_meta(where, {"status": "refused", "reason": f"the export failed ({reason})"})
            raise Refused(f"the export failed ({reason})") from None
        if not diff <= TOLERANCE:  # also refuses NaN
            reason = f"its features differ from torch's by up to {diff:.2e}, over the tolerance {TOLERANCE:g}"
            _write_meta(where, {"status": "refused", "reason": reason, "max_abs_diff": float(diff)})
            raise Refused(reason)
        digest = _sha256(tmp)
        os.replace(tmp, where / "tower.onnx")
        _write_meta(where, {"status": "passed", "sha256": digest, "max_abs_diff": float(diff), "tower": tower.spec()})
    finally:
        tmp.unlink(missing_ok=True)
    log.info("the ONNX export of %s matches torch within %.1e", name, diff)
    return where / "tower.onnx"


def _write_meta(where: Path, meta: dict, stem: str = "tower") -> None:
    """``stem``.json (tower.json, int8.json), written whole or not at all, after the model it vouches for."""
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".json.tmp", dir=where)
    with os.fdopen(fd, "w") as f:
        json.dump({**meta, "versions": _versions(stem)}, f, indent=1, default=str)
    os.replace(tmp, where / f"{stem}.json")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _Forward(nn.Module):
    """The tower's forward over positional tensors, the form the exporter takes."""

    def __init__(self, tower: Tower, names: list[str]):
        super().__init__()
        self.tower, self.names = tower, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.tower(**dict(zip(self.names, tensors))).float()


def _write_onnx(tower: Tower, example: dict[str, torch.Tensor], path: Path) -> None:
    """The dynamo exporter, with a dynamic batch (and sequence) axis. The TorchScript exporter is not tried: on
    transformers 5 it bakes the example's attention mask into MiniLM's graph (features off by 1.7)."""
    names = list(example)
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("sequence", min=1, max=max(2, getattr(tower, "max_length", 512)))
    dims = tuple({0: batch, 1: seq} if n in ("input_ids", "attention_mask") else {0: batch} for n in names)
    for logger in ("onnx_ir", "onnxscript", "torch.onnx"):  # their INFO steps would read as mmfuse's own
        logging.getLogger(logger).setLevel(logging.WARNING)
    # "torchvision is not installed. Skipping torchvision::nms", once per op no tower uses: harmless, and alarming.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    # Exporting must not move the global RNG (a cold run must match a warm one), and a tower first needed inside
    # inference mode (embedding) is traced outside it.
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Forward(tower, names),
            tuple(example.values()),
            str(path),
            input_names=names,
            output_names=["features"],
            dynamo=True,
            dynamic_shapes=(dims,),
            external_data=False,
            verbose=False,
        )


def parity_batches(tower: Tower) -> list[dict[str, torch.Tensor]]:
    """Two fixed batches of different sizes (and text lengths) the export is checked on, made by the tower's own
    ``preprocess``: the first is also what it is traced with."""
    if tower.modality == "text":
        return [tower.preprocess(list(PARITY_TEXTS)), tower.preprocess(list(PARITY_TEXTS[:1]) * 2)]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 40, 3), dtype=np.uint8)) for i in range(5)]
    return [tower.preprocess(images[:3]), tower.preprocess(images[3:])]


def parity(tower: Tower, path: Path, batches: list[dict[str, torch.Tensor]]) -> float:
    """The largest absolute difference between the tower's features in torch and in the export at ``path``, over
    ``batches``; token states are compared at real tokens only (padding is dropped before they are cached)."""
    run, worst = OnnxTower(tower, path), 0.0
    for inputs in batches:
        with torch.inference_mode():
            ref = tower(**inputs).float()
        got = run(**inputs)
        if got.shape != ref.shape:
            raise Refused(f"the export gives features of shape {tuple(got.shape)}, torch {tuple(ref.shape)}")
        diff = (got - ref).abs()
        if tower.sequence:
            diff = diff[inputs["attention_mask"].bool()]
        if diff.numel():
            worst = max(worst, float(diff.max()))  # a NaN anywhere makes the max NaN, which the caller refuses
        if math.isnan(worst):
            return worst
    return worst
