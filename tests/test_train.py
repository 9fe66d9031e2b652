"""Training: loss falls, kill -9 + resume repeats the uninterrupted run, options leave the right parameters
trainable, bad configs fail before any work."""

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from clip4str.train.config import load_config
from clip4str.train.run import build_model, train
from conftest import labelled_folder

WORDS = ["hello", "World", "42", "cafe", "STOP", "x7Q", "Park", "ok"]
SMALL = {"clip": {"embed_dim": 32, "vision_cfg": {"width": 64, "layers": 2, "head_width": 32},
                  "text_cfg": {"width": 32, "heads": 2, "layers": 2}}, "decoder_heads": 4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return labelled_folder(tmp_path_factory.mktemp("words"), WORDS)


def _config(tmp_path, folder, out="run", **train):
    doc = {"model": {"preset": "tiny", **SMALL},
           "data": {"train": [{"path": str(folder)}], "batch_size": 8, "num_workers": 0, "augment": False},
           "train": {"max_steps": 40, "base_lr": 0.1, "decoder_lr_scale": 1.0, "val_every_steps": 1000,
                     "accelerator": "cpu", "precision": "32-true", "log_every_steps": 1,
                     "checkpoint_every_minutes": None, "out_dir": str(tmp_path / out), **train}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def train_then_sigterm_the_group(cfg: Path, out: Path, after_seconds: float) -> tuple[subprocess.Popen, bytes]:
    """Start `clip4str train` in a session of its own, SIGTERM the whole group `after_seconds` after its first
    logged step, and return the process and its stderr once it has ended."""
    cmd = [sys.executable, "-m", "clip4str.cli", "train", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    metrics = out / "logs" / "run-0" / "metrics.csv"
    deadline = time.time() + 300
    while not metrics.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(after_seconds)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc, err


def _losses(out: Path) -> dict[int, float]:
    losses = {}
    for metrics in sorted(out.glob("logs/run-*/metrics.csv")):
        with metrics.open() as f:
            for row in csv.DictReader(f):
                if row.get("loss"):
                    losses[int(row["step"])] = float(row["loss"])
    return losses


@pytest.mark.slow
def test_tiny_config_trains_and_loss_falls(tmp_path, folder):
    result = train(load_config(_config(tmp_path, folder)))
    losses = list(_losses(tmp_path / "run").values())
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert (result / "model.safetensors").is_file() and (tmp_path / "run" / "training.png").is_file()


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_repeats_the_same_run(tmp_path, folder):
    full = _config(tmp_path, folder, "full", max_steps=24, checkpoint_every_steps=8)
    train(load_config(full))
    cut = _config(tmp_path, folder, "cut", max_steps=24, checkpoint_every_steps=8)
    cmd = [sys.executable, "-m", "clip4str.cli", "train", "--config", str(cut)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "cut" / "last.ckpt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint was written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    import torch
    saved_step = torch.load(ckpt, weights_only=True)["global_step"]
    assert 8 <= saved_step < 24, "the kill came too late to test a resume"
    assert subprocess.run(cmd + ["--resume"], capture_output=True).returncode == 0
    with (tmp_path / "cut" / "logs" / "run-1" / "metrics.csv").open() as f:
        first_resumed = min(int(r["step"]) for r in csv.DictReader(f) if r.get("loss"))
    assert first_resumed == saved_step  # it continued from the checkpoint, not from the start
    expected, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(resumed) == sorted(expected) == list(range(24))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("kind", ["hostile", "truncated", "not a checkpoint", "int key", "not a tensor",
                                  "odd schedulers", "odd step", "plain torch.save"])
@pytest.mark.parametrize("action", ["--resume", "--export-last"])
def test_a_hostile_or_broken_last_ckpt_is_refused_in_one_line_without_running_its_code(tmp_path, folder, capsys,
                                                                                         kind, action):
    import torch

    from clip4str.cli import main
    from test_untrusted import RunsCode

    cfg = _config(tmp_path, folder)
    (tmp_path / "run").mkdir()
    last, marker = tmp_path / "run" / "last.ckpt", tmp_path / "ran"
    lightning = {"pytorch-lightning_version": "2.6", "epoch": 0, "loops": {}, "optimizer_states": [],
                 "lr_schedulers": [], "global_step": 3, "state_dict": {"model.w": torch.zeros(1)}}
    foreign = {"int key": {"state_dict": {1: torch.zeros(1)}}, "not a tensor": {"state_dict": {"model.w": "x"}},
               "odd schedulers": {"lr_schedulers": 5}, "odd step": {"global_step": [1]},
               "plain torch.save": {"state_dict": {"model.w": torch.zeros(1)}, "global_step": 0}}
    if kind == "not a checkpoint":
        torch.save({"weights": torch.zeros(2)}, last)
    elif kind == "plain torch.save":  # real-looking weights, none of Lightning's keys: stopped deep in trainer.fit
        torch.save(foreign[kind], last)
    elif kind in foreign:
        torch.save({**lightning, **foreign[kind]}, last)
    else:
        torch.save({"state_dict": {}, "global_step": 3, "callbacks": RunsCode(marker)}, last)
        if kind == "truncated":
            last.write_bytes(last.read_bytes()[:200])
    argv = ["train", "--config", str(cfg)] + (["--resume"] if action == "--resume" else [action, str(tmp_path / "x")])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert err.startswith(f"error: {last} is not a readable training checkpoint") and "\n" not in err, err
    assert not (tmp_path / "x").exists()


def _trainable(overrides):
    cfg = load_config(None, [f"model.{k}={v}" for k, v in overrides.items()])
    cfg.model.overrides.update(SMALL)
    model = build_model(cfg)
    return model, {n for n, p in model.named_parameters() if p.requires_grad}


def test_adapter_trains_only_adapters_and_decoders():
    model, names = _trainable({"peft": "adapter"})
    assert names and all(n.startswith(("image_peft.", "text_peft.", "image_decoder.", "cross_decoder.")) for n in names)
    assert "image_peft.adapter.mlp.0.weight" in names and "text_peft.mlp.2.weight" in names


def test_lst_without_cross_branch_trains_only_the_side_network_and_decoder():
    model, names = _trainable({"peft": "lst", "cross_branch": "false"})
    assert all(n.startswith(("image_peft.", "image_decoder.")) for n in names)
    assert {"image_peft.gates", "image_peft.up.weight", "image_peft.downs.0.weight"} <= names


def test_freezing_options_leave_the_expected_parameters_trainable():
    _, names = _trainable({"text_freeze_layers": 1, "image_freeze_layers": 1})
    assert "clip.transformer.resblocks.0.attn.in_proj_weight" not in names
    assert "clip.transformer.resblocks.1.attn.in_proj_weight" in names
    assert "clip.visual.transformer.resblocks.0.mlp.c_fc.weight" not in names
    assert "clip.visual.transformer.resblocks.1.mlp.c_fc.weight" in names
    assert "clip.token_embedding.weight" not in names and "clip.visual.conv1.weight" not in names
    _, names = _trainable({"text_freeze_layers": 0})  # token embeddings only
    assert "clip.token_embedding.weight" not in names and "clip.transformer.resblocks.0.ln_1.weight" in names
    _, names = _trainable({"cross_branch": "false", "text_freeze_layers": -1})
    assert not any(n.startswith("cross_decoder.") for n in names)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["model.peft=adapter", "model.peft=lst", "model.cross_branch=false",
                                    "model.text_freeze_layers=1"])
def test_each_option_trains_a_few_steps(tmp_path, folder, option):
    cfg = load_config(_config(tmp_path, folder, max_steps=3), [option])
    assert (train(cfg) / "config.json").is_file()


def test_bad_configs_fail_before_training(tmp_path, folder):
    with pytest.raises(ValueError, match="train.max_stepz"):
        load_config(_config(tmp_path, folder), ["train.max_stepz=3"])
    with pytest.raises(ValueError, match="model.nonsense"):
        load_config(None, ["model.nonsense=1"])
    cfg = load_config(_config(tmp_path, folder), [f"data.train=[{{path: {tmp_path / 'missing'}}}]"])
    with pytest.raises(FileNotFoundError, match="missing"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    cfg = load_config(_config(tmp_path, folder), ["data.train=[{path: crops_lmdb}]"])
    with pytest.raises(FileNotFoundError, match=r"'crops_lmdb' \(named in the config\) does not exist \(relative paths"
                                                 rf" are read from the current folder: '{Path.cwd()}/crops_lmdb'\)"):
        train(cfg)
    with pytest.raises(FileNotFoundError, match="--resume"):
        train(load_config(_config(tmp_path, folder)), resume=True)


def test_every_shipped_config_is_valid():
    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(path)
        if cfg.model.init in ("random", "builtin"):  # the others need weight files a user brings
            build_model(cfg)
    # Fine-tuning the built-in model on one's own crops keeps how it reads (CTC head, cascade, second look).
    from clip4str.inference import default_model_path
    from clip4str.weights import load_model
    builtin = load_model(default_model_path()).config
    tuned = build_model(load_config(Path(__file__).parents[1] / "configs" / "finetune-custom.yaml"))
    assert tuned.ctc_head is not None
    assert (tuned.config.cascade_confidence, tuned.config.second_look_confidence) == \
        (builtin.cascade_confidence, builtin.second_look_confidence) != (None, None)


def test_a_runs_written_config_reloads_as_the_same_config(tmp_path):
    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny-builtin-stage5.yaml", ["model.dropout=0.2"])
    assert cfg.model.overrides["ctc_weight"] == 0.5 and cfg.model.overrides["dropout"] == 0.2
    written = tmp_path / "config.yaml"
    written.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert load_config(written) == cfg


SIGNAL_AFTER_OUR_HOOK = """
import os, signal, sys
from clip4str.train.callbacks import ResumableCheckpoint
from clip4str.cli import main
hook = ResumableCheckpoint.on_train_batch_end
def late(self, trainer, *args):
    hook(self, trainer, *args)
    if trainer.global_step == 3:  # after our hook has looked at this step
        os.kill(os.getpid(), signal.SIGTERM)
ResumableCheckpoint.on_train_batch_end = late
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


FAIL_IN_THE_DATA_WORKER = """
import sys
from clip4str.data import datamodule
from clip4str.cli import main
collate, calls = datamodule.collate, []
def failing(batch):
    calls.append(1)
    if len(calls) == 4:
        raise RuntimeError("injected failure in a data worker")
    return collate(batch)
datamodule.collate = failing
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


@pytest.mark.slow
def test_an_error_during_training_with_data_workers_ends_the_process(tmp_path, folder):
    cfg = _config(tmp_path, folder, "fail", max_steps=40)
    doc = yaml.safe_load(cfg.read_text())
    doc["data"]["num_workers"] = 1  # a failed run with live workers must still exit
    cfg.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-c", FAIL_IN_THE_DATA_WORKER, str(cfg)], capture_output=True, timeout=180)
    assert proc.returncode != 0
    assert b"injected failure in a data worker" in proc.stderr


SIGNAL_TO_THE_RUN_AND_ITS_WORKER = """
import os, signal, subprocess, sys
from pathlib import Path
from clip4str.train.callbacks import ResumableCheckpoint
from clip4str.train.system import STRSystem
from clip4str.cli import main

def kill_run_and_worker():  # what `pkill -f <run>` does: the workers' command line is the run's
    os.kill(os.getpid(), signal.SIGTERM)
    # From another process: a worker exits quietly on a SIGTERM from its own parent.
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    subprocess.run(["kill", "-TERM", *children], check=True)
    signal.sigtimedwait([signal.SIGCHLD], 10)  # the worker is gone: PyTorch's check raises right here
    signal.raise_signal(signal.SIGCHLD)

if sys.argv[2] == "in a step":
    step = STRSystem.training_step
    def killing(self, batch, batch_idx):
        if self.global_step == 3:
            kill_run_and_worker()
        return step(self, batch, batch_idx)
    STRSystem.training_step = killing
else:  # after the first of a step's two accumulated batches
    hook = ResumableCheckpoint.on_train_batch_end
    def late(self, trainer, module, outputs, batch, batch_idx):
        hook(self, trainer, module, outputs, batch, batch_idx)
        if batch_idx == 6:
            kill_run_and_worker()
    ResumableCheckpoint.on_train_batch_end = late
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the data worker through Linux's /proc")
@pytest.mark.parametrize("when", ["in a step", "between accumulated batches"])
def test_a_signal_that_also_kills_a_data_worker_mid_step_keeps_the_last_whole_step(tmp_path, folder, when):
    accumulate = 1 if when == "in a step" else 2
    cfg = _config(tmp_path, folder, "both", max_steps=40, checkpoint_every_steps=2,
                  accumulate_grad_batches=accumulate)
    doc = yaml.safe_load(cfg.read_text())
    doc["data"]["num_workers"] = 1
    cfg.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-c", SIGNAL_TO_THE_RUN_AND_ITS_WORKER, str(cfg), when],
                          capture_output=True, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "DataLoader worker" in err, err[-2000:]
    assert "in the middle of step 4, which is not saved" in err, err[-2000:]
    import torch
    assert torch.load(tmp_path / "both" / "last.ckpt", weights_only=True)["global_step"] == 2  # not a half step


@pytest.mark.slow
def test_a_sigterm_after_our_check_saves_at_the_end_of_the_next_step(tmp_path, folder):
    cfg = _config(tmp_path, folder, "late", max_steps=40)
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_OUR_HOOK, str(cfg)], capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    # Our handler replaces Lightning's, which would have stopped the loop first (and, with several ranks,
    # forwarded the signal and broadcast from inside the handler).
    assert b"checkpoint saved at step 4" in proc.stderr
    import torch
    assert torch.load(tmp_path / "late" / "last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_a_checkpoint_and_resume_finishes(tmp_path, folder):
    cfg = _config(tmp_path, folder, "term", max_steps=400)
    doc = yaml.safe_load(cfg.read_text())
    doc["data"]["num_workers"] = 1  # workers leave the group: only the main process gets the signal
    cfg.write_text(yaml.safe_dump(doc))
    proc, err = train_then_sigterm_the_group(cfg, tmp_path / "term", after_seconds=2)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"checkpoint saved" in err
    import torch
    step = torch.load(tmp_path / "term" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < 400
    assert not (tmp_path / "term" / "final").exists()
    # A stopped run ships its last checkpoint: float16 weights, provenance with the steps it reached.
    from clip4str.cli import main
    from clip4str.weights import load_model, read_checkpoint_config
    assert main(["train", "--config", str(cfg), "--export-last", str(tmp_path / "shipped"), "--half"]) == 0
    doc, weights = read_checkpoint_config(tmp_path / "shipped")
    assert doc["provenance"]["steps"] == step and doc["provenance"]["images_seen"] == step * 8
    from safetensors import safe_open
    with safe_open(weights, "pt") as f:
        assert f.get_tensor("image_decoder.head.weight").dtype == torch.float16
    state = torch.load(tmp_path / "term" / "last.ckpt", weights_only=True)["state_dict"]
    shipped = load_model(tmp_path / "shipped").state_dict()
    torch.testing.assert_close(shipped["image_decoder.head.weight"], state["model.image_decoder.head.weight"],
                               atol=1e-3, rtol=1e-3)


def test_init_from_a_clip4str_checkpoint(tmp_path, folder):
    from clip4str.factory import create_model
    from clip4str.weights import save_checkpoint
    source = create_model("tiny", **SMALL)
    save_checkpoint(source, tmp_path / "start", dtype=__import__("torch").float16)
    cfg = load_config(_config(tmp_path, folder), [f"model.init=checkpoint:{tmp_path / 'start'}",
                                                  "model.ctc_weight=0.3"])
    model = build_model(cfg)
    import torch
    for name, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, atol=1e-3, rtol=1e-3)
    assert model.ctc_head is not None  # a training-only head may start fresh
    other = load_config(_config(tmp_path, folder), [f"model.init=checkpoint:{tmp_path / 'start'}"])
    other.model.overrides = {}  # the full-size tiny preset does not fit the small checkpoint
    with pytest.raises(ValueError, match="other model settings"):
        build_model(other)
    # Settings that change what the model computes without changing a weight's shape are checked too.
    mean = load_config(_config(tmp_path, folder), [f"model.init=checkpoint:{tmp_path / 'start'}",
                                                   "model.image_mean=[0.4,0.4,0.4]"])
    with pytest.raises(ValueError, match="image_mean"):
        build_model(mean)
    # A checkpoint keeps its CTC head (which the runaway guard, rescoring and the cascade read with) and its
    # decoding settings in a run whose config does not set them, so a fine-tuned model reads as its parent does;
    # a config that sets them wins (ctc_weight=0 drops the head).
    model.config.second_look_confidence, model.config.cascade_confidence = 0.8, 0.9
    save_checkpoint(model, tmp_path / "with-ctc")
    kept = build_model(load_config(_config(tmp_path, folder), [f"model.init=checkpoint:{tmp_path / 'with-ctc'}"]))
    assert kept.ctc_head is not None and kept.config.ctc_weight == 0.3
    assert (kept.config.second_look_confidence, kept.config.cascade_confidence) == (0.8, 0.9)
    torch.testing.assert_close(kept.state_dict()["ctc_head.weight"], model.state_dict()["ctc_head.weight"])
    plain = build_model(load_config(_config(tmp_path, folder), [f"model.init=checkpoint:{tmp_path / 'with-ctc'}",
                                                                "model.ctc_weight=0",
                                                                "model.second_look_confidence=null"]))
    assert plain.ctc_head is None and plain.config.second_look_confidence is None
    assert plain.config.cascade_confidence == 0.9
    torch.testing.assert_close(plain.state_dict()["image_decoder.head.weight"],
                               model.state_dict()["image_decoder.head.weight"])
    missing = load_config(_config(tmp_path, folder), [f"model.init=checkpoint:{tmp_path / 'nope'}"])
    with pytest.raises(FileNotFoundError):
        train(missing)


def test_a_checkpoint_starts_a_run_at_another_input_size(tmp_path, folder, capsys):
    import torch

    from clip4str.factory import create_model
    from clip4str.weights import save_checkpoint
    source = create_model("tiny", **SMALL)
    save_checkpoint(source, tmp_path / "start")
    h, w = source.config.image_size
    cfg = load_config(_config(tmp_path, folder), [f"model.init=checkpoint:{tmp_path / 'start'}",
                                                  f"model.clip.vision_cfg.image_size=[{h}, {w + 32}]"])
    model = build_model(cfg)
    assert "image positions resampled from 4x16 to 4x20 patches" in capsys.readouterr().err
    assert model.config.image_size == (h, w + 32)
    patch = source.config.clip["vision_cfg"]["patch_size"]
    rows, cols = h // patch[0], w // patch[1]
    old = source.clip.visual.positional_embedding.detach()
    new = model.clip.visual.positional_embedding.detach()
    assert new.shape == (1 + rows * (cols + 4), old.shape[1])
    torch.testing.assert_close(new[0], old[0])  # the class token's position is kept
    # Resampled along the columns only: the first row's embeddings are the old first row's, interpolated.
    expected = torch.nn.functional.interpolate(old[1:].reshape(1, rows, cols, -1).permute(0, 3, 1, 2),
                                               size=(rows, cols + 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(new[1:], expected.permute(0, 2, 3, 1).reshape(rows * (cols + 4), -1))
    for name, value in source.state_dict().items():  # every other weight as it was
        if name != "clip.visual.positional_embedding":
            torch.testing.assert_close(model.state_dict()[name], value)
    with torch.no_grad():
        assert torch.isfinite(model.encode_image(torch.zeros(1, 3, h, w + 32))).all()
    # Other patches cannot be fitted: the error names the setting.
    patches = load_config(_config(tmp_path, folder), [f"model.init=checkpoint:{tmp_path / 'start'}",
                                                      "model.clip.vision_cfg.patch_size=[4, 4]"])
    with pytest.raises(ValueError, match="patch_size"):
        build_model(patches)


def test_a_checkpoint_starts_a_run_with_a_deeper_image_tower_that_reads_as_it_did(tmp_path, folder, capsys):
    import torch

    from clip4str.factory import create_model
    from clip4str.weights import save_checkpoint
    source = create_model("tiny", **SMALL).eval()
    with torch.no_grad():  # trained-looking weights: no block of the source is an identity
        for p in source.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_checkpoint(source, tmp_path / "start")
    cfg = load_config(_config(tmp_path, folder), [f"model.init=checkpoint:{tmp_path / 'start'}",
                                                  "model.clip.vision_cfg.layers=4"])
    model = build_model(cfg).eval()
    assert "image tower 2 -> 4 layers: blocks 2-3 added as identities" in capsys.readouterr().err
    assert len(model.clip.visual.transformer.resblocks) == 4
    new = model.clip.visual.transformer.resblocks[3]
    assert new.attn.out_proj.weight.abs().sum() == 0 and new.mlp.c_proj.bias.abs().sum() == 0
    from clip4str.weights import add_identity_blocks  # every residual-stream output, whatever its initialisation
    fresh = {f"t.1.{k}": torch.ones(2) for k in ("attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_proj.weight",
                                                  "mlp.c_proj.bias", "mlp.c_fc.weight", "ln_1.weight")}
    grown = add_identity_blocks({"t.0.x": torch.ones(1)}, fresh, "t.", 1, 2)
    assert {k for k, v in grown.items() if v.abs().sum() == 0} == set(list(fresh)[:4])
    assert new.mlp.c_fc.weight.abs().sum() > 0  # the rest of a new block starts as a fresh one
    images = torch.randn(3, 3, *source.config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), source.encode_image(images), atol=1e-5, rtol=1e-5)
        a, b = source.decode(images), model.decode(images)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
    loss = model.train()(images, ["ab", "cd", "e"]).loss  # and it trains: the new blocks get gradients
    loss.backward()
    assert new.attn.out_proj.weight.grad.abs().sum() > 0
    fewer = load_config(_config(tmp_path, folder), [f"model.init=checkpoint:{tmp_path / 'start'}",
                                                    "model.clip.vision_cfg.layers=1"])
    with pytest.raises(ValueError, match="has 2 image-tower layers, the config 1"):
        build_model(fewer)


def test_a_run_from_a_checkpoint_records_that_checkpoints_provenance(tmp_path, folder):
    import json

    from clip4str.factory import create_model
    from clip4str.train.run import export_last
    from clip4str.weights import save_checkpoint
    save_checkpoint(create_model("tiny", **SMALL), tmp_path / "parent", provenance={"steps": 7, "note": "parent"})
    cfg = load_config(_config(tmp_path, folder, max_steps=2), [f"model.init=checkpoint:{tmp_path / 'parent'}"])
    final = train(cfg)
    # The parent is replaced after the run started (as the built-in model is when a stage ships): the export
    # still names the checkpoint the run started from.
    save_checkpoint(create_model("tiny", **SMALL), tmp_path / "parent", provenance={"note": "replaced"}, force=True)
    for folder_ in (final, export_last(cfg, tmp_path / "exported")):
        doc = json.loads((folder_ / "config.json").read_text())["provenance"]
        assert doc["steps"] == 2 and doc["images_seen"] == 16
        assert doc["started_from"] == {"init": f"checkpoint:{tmp_path / 'parent'}",
                                       "provenance": {"steps": 7, "note": "parent"}}
    fresh = train(load_config(_config(tmp_path, folder, out="fresh", max_steps=1)))
    assert "started_from" not in json.loads((fresh / "config.json").read_text())["provenance"]
    # A new user's first guesses at "the model" of a run: its last.ckpt, its folder.
    from clip4str.inference import Recognizer
    with pytest.raises(ValueError, match=r"is a clip4str training checkpoint \(a run's last.ckpt\), not a model: "
                                         r"give the run's final/ folder"):
        Recognizer.from_pretrained(fresh.parent / "last.ckpt")
    with pytest.raises(FileNotFoundError, match=r"training run's folder: its model is in '.*fresh/final'"):
        Recognizer.from_pretrained(fresh.parent)


RAISE_WITH_LIVE_WORKERS = """
import sys
from clip4str.charset import CHARSETS
from clip4str.data.datamodule import Source, STRDataModule
dm = STRDataModule([Source(sys.argv[1])], [], CHARSETS["36"], (32, 128), [0.5] * 3, [0.5] * 3, batch_size=4,
                   num_workers=2)
dm.setup()
next(iter(dm.train_dataloader()))
raise RuntimeError("raised with workers alive")
"""


def test_a_script_that_raises_while_data_workers_run_exits(folder):
    # Workers must stay killable by their parent: multiprocessing terminates and joins them at exit.
    proc = subprocess.run([sys.executable, "-c", RAISE_WITH_LIVE_WORKERS, str(folder)], capture_output=True,
                          timeout=90)
    assert proc.returncode == 1
    assert b"raised with workers alive" in proc.stderr


def test_gradients_are_clipped_before_the_fused_optimizer_steps():
    import torch

    from clip4str.train.system import STRSystem

    cfg = load_config(None, ["train.grad_clip=0.5", "train.precision=bf16-mixed"])
    cfg.model.overrides.update(SMALL)
    system = STRSystem(build_model(cfg), cfg.train, 64, [])
    opt = system.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"]  # bf16-mixed: fused, which Lightning would refuse to clip for
    for p in system.parameters():
        p.grad = torch.full_like(p, 3.0) if p.requires_grad else None
    system.on_before_optimizer_step(opt)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in system.parameters() if p.grad is not None]))
    assert float(norm) == pytest.approx(0.5, rel=1e-4)


def test_resuming_with_another_model_or_schedule_is_refused_before_any_work(tmp_path, folder):
    from clip4str.train.resume import check_resumable

    cfg = load_config(_config(tmp_path, folder, max_steps=40))
    model = build_model(cfg)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 3,
            "lr_schedulers": [{"total_steps": 40, "last_epoch": 3}]}
    check_resumable(ckpt, model, cfg.train, Path("last.ckpt"))  # the same model and schedule
    with pytest.raises(ValueError, match="ends at step 40, not train.max_steps=80"):
        check_resumable(ckpt, model, load_config(_config(tmp_path, folder, max_steps=80)).train, Path("last.ckpt"))
    with pytest.raises(ValueError, match="not a time budget"):
        check_resumable(ckpt, model, load_config(_config(tmp_path, folder, max_minutes=5)).train, Path("last.ckpt"))
    budget = {**ckpt, "lr_schedulers": [{"base_lrs": [0.1], "last_epoch": 3, "lr_lambdas": [None]}]}
    with pytest.raises(ValueError, match="time budget"):
        check_resumable(budget, model, cfg.train, Path("last.ckpt"))
    swa = {**ckpt, "lr_schedulers": [{"base_lrs": [0.1], "last_epoch": 3, "anneal_epochs": 10}]}
    check_resumable(swa, model, cfg.train, Path("last.ckpt"))
    other = build_model(load_config(_config(tmp_path, folder), ["model.decoder_depth=2"]))
    with pytest.raises(ValueError, match="does not fit this model") as err:
        check_resumable(ckpt, other, cfg.train, Path("last.ckpt"))
    assert "\n" not in str(err.value)


def test_a_recipe_is_refused_on_a_machine_with_fewer_fonts_or_photos_than_it_asks_for(tmp_path, folder):
    from clip4str.charset import CHARSETS
    from clip4str.data.fonts import discover_fonts, usable_fonts
    from clip4str.train.run import build_datamodule

    fonts = tmp_path / "fonts"
    fonts.mkdir()
    # Two fonts that draw the charset (DejaVu at least is everywhere: matplotlib ships it), under distinct names.
    for i, f in enumerate(usable_fonts(tuple(map(str, discover_fonts())), CHARSETS["94"])[:2]):
        (fonts / f"{i}{Path(f.path).suffix}").write_bytes(Path(f.path).read_bytes())
    cfg = _config(tmp_path, folder)
    doc = yaml.safe_load(cfg.read_text())
    doc["data"].update(train=[{"path": "synth", "weight": 1.0}], fonts=[str(fonts)], backgrounds=[str(fonts)],
                       min_fonts=3, min_photos=0)
    cfg.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"would use 2 fonts and 0 background photos; this recipe asks for at least "
                                         r"3 and 0 \(data.min_fonts"):
        train(load_config(str(cfg)))
    assert not (tmp_path / "run" / "last.ckpt").exists()
    doc["data"]["min_fonts"] = 2
    cfg.write_text(yaml.safe_dump(doc))
    loaded = load_config(str(cfg))
    assert len(build_datamodule(loaded, build_model(loaded)).renderers[0].fonts) == 2


def test_a_small_source_still_holds_one_sample_out_and_each_validation_prints_one_line(tmp_path, folder, capsys):
    from clip4str.data.datamodule import holdout_split

    assert holdout_split(8, 0.05) != (list(range(8)), []) and len(holdout_split(8, 0.05)[1]) == 1
    assert holdout_split(1, 0.5) == ([0], []) and len(holdout_split(6725, 0.05)[1]) == 336
    cfg = _config(tmp_path, folder, max_steps=2, val_every_steps=2)
    doc = yaml.safe_load(cfg.read_text())
    doc["data"]["train"][0]["holdout"] = 0.05  # 5% of 8 words rounds to none
    cfg.write_text(yaml.safe_dump(doc))
    train(load_config(str(cfg)))
    err = capsys.readouterr().err
    assert re.search(rf"step 2: validation word accuracy {folder.name}-holdout \d+\.\d% of 1\n", err), err


def _weights_after_each_step(monkeypatch) -> dict[int, dict]:
    """Record the model's own weights after every optimiser step of an in-process run."""
    from clip4str.train.callbacks import ResumableCheckpoint
    seen, hook = {}, ResumableCheckpoint.on_train_batch_end

    def recording(self, trainer, module, *args):
        seen[trainer.global_step] = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
        hook(self, trainer, module, *args)
    monkeypatch.setattr(ResumableCheckpoint, "on_train_batch_end", recording)
    return seen


@pytest.mark.slow
def test_average_from_exports_the_mean_of_every_steps_weights_from_that_share_on(tmp_path, folder, monkeypatch):
    import torch

    from clip4str.weights import load_model
    seen = _weights_after_each_step(monkeypatch)
    result = train(load_config(_config(tmp_path, folder, "avg", max_steps=8, average_from=0.5, val_every_steps=6)))
    assert sorted(seen) == list(range(1, 9))
    exported = load_model(result).state_dict()
    for name in ("image_decoder.head.weight", "clip.visual.conv1.weight", "cross_decoder.pos_queries"):
        mean = torch.stack([seen[step][name] for step in range(4, 9)]).mean(0)  # steps 4..8: from half of 8 on
        torch.testing.assert_close(exported[name], mean, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(exported[name], seen[8][name])  # not simply the last step's weights


AVERAGING_SIGTERM_AT = """
import os, sys
from clip4str.train.callbacks import ResumableCheckpoint
from clip4str.cli import main
hook, at = ResumableCheckpoint.on_train_batch_end, int(sys.argv[2])
def signalled(self, trainer, *args):
    if trainer.global_step == at:
        self._signal = 15  # as SIGTERM's handler does
    hook(self, trainer, *args)
ResumableCheckpoint.on_train_batch_end = signalled
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [2, 6])  # before the average begins (step 4) and while it runs
def test_a_run_with_averaging_stopped_and_resumed_ends_as_an_uninterrupted_one(tmp_path, folder, stop_at):
    import torch

    from clip4str.weights import load_model
    full = train(load_config(_config(tmp_path, folder, "full", max_steps=8, average_from=0.5)))
    cut = _config(tmp_path, folder, "cut", max_steps=8, average_from=0.5)
    proc = subprocess.run([sys.executable, "-c", AVERAGING_SIGTERM_AT, str(cut), str(stop_at)], capture_output=True,
                          timeout=300)
    assert proc.returncode == 0 and f"checkpoint saved at step {stop_at}".encode() in proc.stderr, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)
    assert ("averaging_state" in ckpt) == (stop_at >= 4)  # before it begins, the checkpoint holds the run's weights
    from clip4str.cli import main
    assert main(["train", "--config", str(cut), "--resume"]) == 0
    expected, resumed = load_model(full).state_dict(), load_model(tmp_path / "cut" / "final").state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, atol=1e-5, rtol=1e-4, msg=name)
    # Resuming an averaged run without its averaging would go on from the average: refused in one line.
    if stop_at >= 4:
        with pytest.raises(ValueError, match=r"resume it with train.average_from set"):
            from clip4str.train.resume import check_resumable
            check_resumable(ckpt, load_model(full), load_config(cut, ["train.average_from=null"]).train,
                            Path("last.ckpt"))


def test_average_from_outside_its_range_and_the_old_swa_key_are_refused_in_one_line(tmp_path, folder):
    for value in ("1.0", "-0.1"):
        with pytest.raises(ValueError, match=r"train.average_from"):
            load_config(_config(tmp_path, folder), [f"train.average_from={value}"])
    with pytest.raises(ValueError, match="train.swa_lr is gone.*train.average_from"):
        load_config(_config(tmp_path, folder), ["train.swa_lr=0.001"])
    # An earlier run's config.yaml says `swa_lr: null`: it still reloads.
    assert load_config(_config(tmp_path, folder), ["train.swa_lr=null"]).train.average_from is None


def test_a_checkpoint_saved_during_validation_still_holds_the_average_as_its_weights():
    """A signal, then an error inside validation, saves while the average is swapped into the live module."""
    import lightning as L
    import torch

    from clip4str.train.averaging import TailAveraging

    class One(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    module, avg = One(), TailAveraging(0.0, 10)
    avg.setup(None, module, "fit")
    for value in (1.0, 2.0):  # two steps' weights averaged: 1.5
        module.w.data.fill_(value)
        avg._average_model.update_parameters(module)
    module.w.data.fill_(3.0)  # the run's own weights
    avg.on_validation_epoch_start(None, module)
    assert float(module.w) == 1.5  # validation reads the average
    checkpoint = {"state_dict": {k: v.clone() for k, v in module.state_dict().items()}}
    avg.on_save_checkpoint(None, module, checkpoint)
    assert float(checkpoint["state_dict"]["w"]) == 1.5 and float(checkpoint["current_model_state"]["w"]) == 3.0
    avg.on_validation_epoch_end(None, module)
    assert float(module.w) == 3.0


def test_a_run_on_unreadable_data_or_with_a_nan_loss_stops_with_one_line(tmp_path, folder, monkeypatch):
    """Every image damaged: the run stops after 20 empty batches instead of 'finishing' without a loss. A loss
    that turns NaN (checked at the logging steps) stops the run before it writes NaN weights as its result."""
    from clip4str.model import CLIP4STR
    from clip4str.train.system import NonFiniteLoss, UnreadableTrainingData

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(8):
        (bad / f"{i}.png").write_bytes(b"\x89PNG damaged")
    (bad / "labels.tsv").write_text("".join(f"{i}.png\tword\n" for i in range(8)))
    with pytest.warns(UserWarning), pytest.raises(UnreadableTrainingData, match="last 20 batches"):
        train(load_config(_config(tmp_path, bad, out="bad-run", max_steps=50)))
    assert not (tmp_path / "bad-run" / "final").exists()

    forward = CLIP4STR.forward

    def turns_nan(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training and getattr(self, "_calls", 0) >= 3:
            out.loss = out.loss * float("nan")
        self._calls = getattr(self, "_calls", 0) + 1
        return out

    monkeypatch.setattr(CLIP4STR, "forward", turns_nan)
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 4"):
        train(load_config(_config(tmp_path, folder, out="nan-run", max_steps=10)))
    assert not (tmp_path / "nan-run" / "final").exists()


def test_a_run_never_writes_over_another_runs_folder(tmp_path, folder):
    """A second run into a folder another run is writing is refused (the later one's model replaced the first's
    under the same result path), and so is a new run into a finished run's folder whose last.ckpt was deleted."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # what a running `clip4str train` holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FileExistsError, match="another `clip4str train` is writing to"):
            train(load_config(_config(tmp_path, folder, max_steps=2)))
    assert train(load_config(_config(tmp_path, folder, max_steps=2))) == out / "final"
    (out / "last.ckpt").unlink()  # kept only the model, as people do
    before = (out / "final" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="holds another run's final, config.yaml, logs"):
        train(load_config(_config(tmp_path, folder, max_steps=2, seed=5)))
    assert (out / "final" / "model.safetensors").read_bytes() == before


def test_a_run_from_a_removed_checkpoint_resumes_with_the_settings_it_inherited(tmp_path, folder):
    """The settings a run took from its start checkpoint are written into its config.yaml, and a resume or export
    after that checkpoint was deleted reads them from there (it built a model without the CTC head)."""
    import torch

    from clip4str.factory import create_model
    from clip4str.weights import save_checkpoint

    parent = create_model("tiny", **SMALL, ctc_weight=0.5, cascade_confidence=0.9)
    save_checkpoint(parent, tmp_path / "parent", dtype=torch.float16)
    cfg = load_config(_config(tmp_path, folder, max_steps=2), [f"model.init=checkpoint:{tmp_path / 'parent'}"])
    train(cfg)
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert (written["ctc_weight"], written["cascade_confidence"]) == (0.5, 0.9)
    shutil.rmtree(tmp_path / "parent")
    again = load_config(_config(tmp_path, folder, max_steps=2), [f"model.init=checkpoint:{tmp_path / 'parent'}"])
    model = build_model(again, init=False)
    assert model.ctc_head is not None and model.config.cascade_confidence == 0.9
