"""The CPU engine for frozen towers (models.towers.onnx_engine): each tower exported to ONNX once per fingerprint under
MMFUSE_HOME, checked against torch, reused, rebuilt when damaged, refused with its reason; --backend torch opts out."""

import json
import logging
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from conftest import TOY, write_toy

from mmfuse.cli import main
from mmfuse.config import ModelConfig
from mmfuse.errors import MmfuseError
from mmfuse.features.sources import embed
from mmfuse.inference.backends import run_towers
from mmfuse.inference.predictor import Predictor
from mmfuse.models.classifier import build_model
from mmfuse.models.towers import build_text, build_vision, onnx_engine
from mmfuse.models.towers.factory import build_tower, requested_spec
from mmfuse.models.towers.onnx_engine import OnnxTower, engine, resolve
from mmfuse.paths import mmfuse_home


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory, tiny_roberta_dir, tiny_vit_dir):
    """The tiny towers' exports, made once by the real exporter: tests of the cache's workings copy them instead of
    exporting again (10 s each on 2 cores)."""
    out = tmp_path_factory.mktemp("prebuilt")
    made = {}
    for tower in (build_text(str(tiny_roberta_dir), pooling="mean"), build_vision(str(tiny_vit_dir))):
        tower.freeze()
        path = out / f"{tower.fingerprint}.onnx"
        onnx_engine._write_onnx(tower, onnx_engine.parity_batches(tower)[0], path)
        made[tower.fingerprint] = path
    return made


@pytest.fixture(autouse=True)
def exports(monkeypatch, prebuilt):
    """Each test starts as a new process would (no session loaded, no refusal remembered), and every export is
    counted; a tower prebuilt gets a copy of its export."""
    monkeypatch.setattr(onnx_engine, "_LOADED", {})
    monkeypatch.setattr(onnx_engine, "_REFUSED", {})
    calls = []
    real = onnx_engine._write_onnx

    def counted(tower, example, path):
        calls.append(tower.spec()["name"])
        if onnx_engine.folder(tower).name in prebuilt:  # an int8 tower's float32 export too
            return shutil.copyfile(prebuilt[onnx_engine.folder(tower).name], path)
        return real(tower, example, path)

    monkeypatch.setattr(onnx_engine, "_write_onnx", counted)
    return calls


@pytest.fixture
def text_tower(tiny_roberta_dir):
    tower = build_text(str(tiny_roberta_dir), pooling="mean")
    tower.freeze()
    return tower


TEXTS = ["a red apple on a table", "an old blue train", "x", "the quiet shiny wooden train near a big bright apple"]


def features(run, tower, items):
    with torch.inference_mode():
        return run(**tower.preprocess(items)).float()


def test_export_matches_torch_and_is_made_once(text_tower, exports):
    run = engine(text_tower, "onnx")
    assert isinstance(run, OnnxTower)
    # Idle threads must not spin between calls: in a server they took the cores from request handling.
    assert run.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    torch.testing.assert_close(
        features(run, text_tower, TEXTS), features(text_tower, text_tower, TEXTS), atol=1e-4, rtol=0
    )
    meta = json.loads((onnx_engine.folder(text_tower) / "tower.json").read_text())
    assert meta["status"] == "passed" and meta["max_abs_diff"] <= 1e-4
    assert onnx_engine.folder(text_tower).parent == mmfuse_home() / "onnx-towers"

    onnx_engine._LOADED.clear()  # a new process: the export on disk is loaded, not made again
    again = engine(text_tower, "auto")
    assert isinstance(again, OnnxTower) and again is not run
    assert exports == [text_tower.spec()["name"]]


def test_token_states_and_images_match_torch(tiny_roberta_dir, tiny_vit_dir):
    states = build_text(str(tiny_roberta_dir), pooling="attention")
    states.freeze()
    run = engine(states, "onnx")
    inputs = states.preprocess(TEXTS)
    got, ref = features(run, states, TEXTS), features(states, states, TEXTS)
    assert got.shape == ref.shape == (4, inputs["input_ids"].shape[1], states.dim)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=0)

    vision = build_vision(str(tiny_vit_dir))
    vision.freeze()
    rng = np.random.default_rng(1)
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 256, (40, 30 + i, 3), dtype=np.uint8)) for i in range(5)]
    run = engine(vision, "onnx")
    assert vision.preprocess(images)["pixel_values"].dtype == torch.uint8  # the graph normalises, as the tower does
    torch.testing.assert_close(features(run, vision, images), features(vision, vision, images), atol=1e-4, rtol=0)


def test_a_damaged_or_half_written_export_is_made_again(text_tower, exports):
    engine(text_tower, "onnx")
    where = onnx_engine.folder(text_tower)
    good = (where / "tower.onnx").read_bytes()
    (where / "tower.onnx").write_bytes(good[: len(good) // 2])  # cut short, as by a full disk
    (where / ".tower.abc.onnx.tmp").write_bytes(b"half")  # a writer killed before its rename
    onnx_engine._LOADED.clear()
    run = engine(text_tower, "onnx")
    assert isinstance(run, OnnxTower) and len(exports) == 2
    assert (where / "tower.onnx").stat().st_size == len(good)
    torch.testing.assert_close(
        features(run, text_tower, TEXTS), features(text_tower, text_tower, TEXTS), atol=1e-4, rtol=0
    )

    (where / "tower.json").write_text("{not json")  # the record itself damaged
    onnx_engine._LOADED.clear()
    assert isinstance(engine(text_tower, "onnx"), OnnxTower) and len(exports) == 3


def test_an_export_off_by_more_than_the_tolerance_is_refused(text_tower, exports, monkeypatch, caplog):
    monkeypatch.setattr(onnx_engine, "parity", lambda *a: 0.5)
    with caplog.at_level(logging.WARNING):
        assert engine(text_tower, "auto") is text_tower  # auto: torch, with the reason
    assert "refused" in caplog.text and "5.00e-01" in caplog.text
    meta = json.loads((onnx_engine.folder(text_tower) / "tower.json").read_text())
    assert meta["status"] == "refused" and not (onnx_engine.folder(text_tower) / "tower.onnx").exists()
    with pytest.raises(MmfuseError, match="refused: its features differ from torch's by up to 5.00e-01"):
        engine(text_tower, "onnx")  # asked for: an error, from the recorded refusal
    assert len(exports) == 1  # the refusal is recorded, not tried again


def test_an_export_that_fails_is_refused_with_the_reason(text_tower, monkeypatch):
    def broken(*a):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(onnx_engine, "_write_onnx", broken)
    with pytest.raises(MmfuseError, match="the export failed .RuntimeError: cannot trace this"):
        engine(text_tower, "onnx")


def test_torch_opts_out_and_gpus_keep_torch(text_tower, exports, monkeypatch):
    assert engine(text_tower, "torch") is text_tower
    assert resolve("auto", "cuda") == "torch"
    with pytest.raises(MmfuseError, match="on the CPU"):
        resolve("onnx", "cuda")
    monkeypatch.setattr(onnx_engine, "onnxruntime_module", lambda: None)
    assert resolve("auto") == "torch" and engine(text_tower, "auto") is text_tower  # quietly, without onnxruntime
    with pytest.raises(MmfuseError, match=r"pip install 'mmfuse\[export\]'"):
        engine(text_tower, "onnx")
    assert exports == [] and not (mmfuse_home() / "onnx-towers").exists()
    with pytest.raises(MmfuseError, match="--backend must be one of"):
        ModelConfig(backend="tensorrt")


def test_concurrent_first_uses_export_once(text_tower, exports):
    results, errors = [], []

    def use():
        try:
            results.append(onnx_engine.load_or_export(text_tower))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(exports) == 1


def test_available_cores_counts_what_this_process_may_use():
    cores = onnx_engine.available_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))


def test_embedded_features_agree_across_backends_and_share_the_cache_key(tiny_vit_dir, tiny_roberta_dir, tmp_path):
    toy = write_toy(tmp_path / "toy", **TOY)
    from mmfuse.data.read import read_data

    records = read_data(toy / "all.csv")[0][:12]
    got = {}
    for backend in ("torch", "onnx"):
        cfg = ModelConfig(vision=str(tiny_vit_dir), text=str(tiny_roberta_dir), text_pooling="mean", backend=backend)
        model = build_model(cfg, 2).eval()
        got[backend] = {m: embed(model, m, records, None, batch_size=5, show=False) for m in ("image", "text")}
        assert (mmfuse_home() / "onnx-towers").exists() == (backend == "onnx")
        fps = {m: model.cards[m].fingerprint for m in ("image", "text")}
        if backend == "torch":
            first = fps
    assert fps == first  # the feature cache's key does not change with the backend
    for m in ("image", "text"):
        torch.testing.assert_close(got["onnx"][m], got["torch"][m], atol=1e-4, rtol=0)


def test_train_predict_and_evaluate_choose_the_engine_by_backend(tiny_vit_dir, tiny_roberta_dir, tmp_path, exports):
    toy = write_toy(tmp_path / "toy", **TOY)
    towers = ["--vision", str(tiny_vit_dir), "--text", str(tiny_roberta_dir), "--text-pooling", "mean"]
    run = tmp_path / "run"
    args = ["train", str(toy / "train.csv"), "--tune", "head", "--epochs", "1", *towers, "--out", str(run)]
    assert main([*args, "--backend", "torch"]) == 0
    assert not (mmfuse_home() / "onnx-towers").exists() and exports == []  # opted out: nothing exported

    images = [str(p) for p in sorted(toy.rglob("*.png"))[:6]]
    texts = TEXTS + TEXTS[:2]
    ref = run_towers(Predictor(run), "torch").predict(images, texts).probs
    assert Predictor(run).models[0].cfg.backend == "torch"  # as trained, unless told otherwise
    auto = run_towers(Predictor(run), "auto").predict(images, texts).probs  # 6 inputs: not worth an export yet
    assert exports == [] and onnx_engine._LOADED == {}
    np.testing.assert_array_equal(auto, ref)
    probs = run_towers(Predictor(run), "onnx").predict(images, texts).probs
    assert len(exports) == 2 and len(list((mmfuse_home() / "onnx-towers").glob("*/tower.onnx"))) == 2
    np.testing.assert_allclose(probs, ref, atol=1e-4)

    onnx_engine._LOADED.clear()  # a new process: auto now uses the exports made, for any number of inputs
    two = run_towers(Predictor(run), "auto").predict(images[:2], texts[:2]).probs
    np.testing.assert_allclose(two, ref[:2], atol=1e-4)
    assert len(onnx_engine._LOADED) == 2 and len(exports) == 2
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), str(toy / "val.csv"), "--out", str(out), "--backend", "onnx"]) == 0
    assert (out / "metrics.json").is_file()


def test_auto_exports_for_a_pass_large_enough(tiny_vit_dir, tiny_roberta_dir, tmp_path, exports, monkeypatch):
    toy = write_toy(tmp_path / "toy", **TOY)
    from mmfuse.data.read import read_data

    records = read_data(toy / "all.csv")[0][:12]
    model = build_model(ModelConfig(vision=str(tiny_vit_dir), text=str(tiny_roberta_dir), text_pooling="mean"), 2)
    embed(model.eval(), "text", records, None, show=False)
    assert exports == []  # 12 texts: torch
    monkeypatch.setitem(onnx_engine.AUTO_EXPORT_ITEMS, "text", 12)
    embed(model, "text", records, None, show=False)
    assert len(exports) == 1 and len(onnx_engine._LOADED) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet-lite0", "minilm"])
def test_packaged_towers_export_within_tolerance(name):
    tower = build_vision(name) if name.startswith("efficientnet") else build_text(name)
    tower.freeze()
    run = engine(tower, "onnx")
    assert isinstance(run, OnnxTower)
    meta = json.loads((onnx_engine.folder(tower) / "tower.json").read_text())
    assert meta["status"] == "passed" and meta["max_abs_diff"] <= 1e-4
    batch = onnx_engine.parity_batches(tower)[1]
    with torch.inference_mode():
        ref = tower(**batch)
    got = run(**batch)
    if tower.sequence:
        real = batch["attention_mask"].bool()
        got, ref = got[real], ref[real]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_imagenet_tags_captioner_runs_lite0_in_onnxruntime(tmp_path):
    from PIL import Image

    from mmfuse.captioning.captioners import ImageNetTagsCaptioner

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)) for _ in range(4)]
    ref = ImageNetTagsCaptioner(backend="torch")
    assert ref(images) and onnx_engine._LOADED == {}
    onnx = ImageNetTagsCaptioner(backend="onnx")
    with torch.inference_mode():
        pixels = onnx.tower.preprocess(images)["pixel_values"]
        want = ref.tower.imagenet_logits(pixels)
        got = onnx.tower.model._fc(engine(onnx.tower, "onnx")(pixel_values=pixels))
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    assert onnx(images) == ref(images)


def test_a_home_that_cannot_be_written_keeps_torch(text_tower, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MMFUSE_HOME", str(blocker))  # onnx-towers/ cannot be made under a file
    assert engine(text_tower, "auto") is text_tower
    with pytest.raises(MmfuseError, match="could not be written or read"):
        onnx_engine._REFUSED.clear()
        engine(text_tower, "onnx")


def int8_tower(tiny_roberta_dir, pooling="mean"):
    tower = build_tower(
        {**requested_spec("text", ModelConfig(text=str(tiny_roberta_dir), text_pooling=pooling)), "quantize": "int8"}
    )
    tower.freeze()
    return tower


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_int8_runs_a_quantised_export_beside_the_float32_one(tiny_roberta_dir, text_tower, exports, pooling):
    tower = int8_tower(tiny_roberta_dir, pooling)
    fp32 = build_text(str(tiny_roberta_dir), pooling=pooling)
    assert tower.fingerprint != fp32.fingerprint  # int8 features are cached apart
    assert onnx_engine.folder(tower) == onnx_engine.folder(fp32)  # made from the one float32 export
    run = engine(tower, "auto", items=1)  # int8 always runs in onnxruntime, however few the inputs
    assert isinstance(run, OnnxTower) and run.path.name == "int8.onnx"
    meta = json.loads((onnx_engine.folder(tower) / "int8.json").read_text())
    assert meta["status"] == "passed" and meta["min_cosine"] >= onnx_engine.INT8_MIN_COSINE
    got, ref = features(run, tower, TEXTS), features(fp32, fp32, TEXTS)
    assert not torch.allclose(got, ref, atol=1e-5)  # quantised: not the float32 features
    if pooling == "mean":
        assert float(torch.nn.functional.cosine_similarity(got, ref).min()) >= onnx_engine.INT8_MIN_COSINE
    onnx_engine._LOADED.clear()  # a new process reuses both files
    assert engine(tower, "onnx").path == run.path and exports == [tower.spec()["name"]]


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_an_int8_text_has_the_same_features_alone_and_in_any_batch(tiny_roberta_dir, pooling):
    """One activation scale per token (models.towers.int8): the server batches a request with others, and its answer
    must be predict's on the same row. With one scale per tensor the long texts changed the short one's features."""
    tower = int8_tower(tiny_roberta_dir, pooling)
    run = engine(tower, "onnx")
    alone = features(run, tower, TEXTS[:1])[0]
    beside = features(run, tower, [TEXTS[3], TEXTS[0], TEXTS[3] * 3])[1]
    if tower.sequence:  # token states: the real tokens' (the batch pads the short text)
        beside = beside[: len(alone)]
    torch.testing.assert_close(beside, alone, atol=1e-5, rtol=0)


def test_int8_that_disagrees_with_float32_is_refused_and_never_falls_back(tiny_roberta_dir, exports, monkeypatch):
    tower = int8_tower(tiny_roberta_dir)
    monkeypatch.setattr(onnx_engine, "INT8_MIN_COSINE", 1.01)
    with pytest.raises(MmfuseError, match="int8 export of the text tower .* was refused: its features agree"):
        engine(tower, "auto")
    assert json.loads((onnx_engine.folder(tower) / "int8.json").read_text())["status"] == "refused"
    with pytest.raises(MmfuseError, match="would run in torch"):
        engine(tower, "auto", device="meta")  # a GPU (any device but the CPU) keeps torch: int8 cannot run there


@pytest.mark.parametrize(
    ("flags", "says"),
    [(["--backend", "torch"], "--backend torch keeps it in torch"), (["--tune", "text"], "--tune text fine-tunes")],
)
def test_int8_with_what_cannot_run_it_says_so(toy_manifest, tmp_path, capsys, flags, says):
    args = ["train", str(toy_manifest), "--out", str(tmp_path / "r"), "--quantize", "int8", *flags]
    assert main(args) == 2
    assert says in capsys.readouterr().err


def test_a_run_trained_in_int8_predicts_in_int8_and_export_refuses_it(tiny_vit_dir, tiny_roberta_dir, tmp_path):
    toy = write_toy(tmp_path / "toy", **TOY)
    towers = ["--vision", str(tiny_vit_dir), "--text", str(tiny_roberta_dir), "--text-pooling", "mean"]
    run, plain = tmp_path / "int8", tmp_path / "fp32"
    args = ["train", str(toy / "train.csv"), "--tune", "head", "--epochs", "1", "--seed", "0", *towers]
    assert main([*args, "--out", str(plain)]) == 0
    assert main([*args, "--out", str(run), "--quantize", "int8"]) == 0
    images = [str(p) for p in sorted(toy.rglob("*.png"))[:6]]
    loaded = Predictor(run)
    assert loaded.models[0].cards["text"].spec["quantize"] == "int8"
    probs = loaded.predict(images, TEXTS + TEXTS[:2]).probs
    onnx_engine._LOADED.clear()
    again = run_towers(Predictor(run), "onnx").predict(images, TEXTS + TEXTS[:2]).probs
    np.testing.assert_allclose(probs, again, atol=1e-5)  # int8 wherever it runs
    with pytest.raises(MmfuseError, match="--backend torch keeps it in torch"):
        run_towers(Predictor(run), "torch").predict(images[:1], TEXTS[:1])
    assert main(["export", str(run), "--out", str(tmp_path / "onnx")]) == 2
    assert main(["export", str(plain), "--out", str(tmp_path / "onnx-fp32")]) == 0


def test_int8_is_refused_up_front_for_a_packaged_tower_measured_to_lose(monkeypatch):
    monkeypatch.setitem(onnx_engine.INT8_MEASURED, "mpnet", "its features agree with float32 at a cosine of 0.866")
    with pytest.raises(MmfuseError, match="refused for the text tower mpnet: its features agree .* 0.866"):
        requested_spec("text", ModelConfig(text="mpnet", quantize="int8"))  # before its weights are looked for
    monkeypatch.setitem(onnx_engine.INT8_MEASURED, "minilm", 0.02)  # a loss over the 0.005 allowed
    with pytest.raises(MmfuseError, match="lost 0.020 weighted F1 in cross-validation"):
        requested_spec("text", ModelConfig(text="minilm", quantize="int8"))
    assert onnx_engine.int8_refusal("some/hub-model") is None  # unmeasured: the cosine floor checks it
