"""External checkpoints are read without running code from them and without the packages that made them: the
authors' Lightning checkpoints with Hydra/OmegaConf hyper-parameters, and hostile pickles."""

import collections
import os
import pickle
import struct
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from clip4str.cli import main
from clip4str.convert import read_authors_state
from clip4str.inference import Recognizer
from clip4str.untrusted import Inert, load_untrusted
from clip4str.weights import load_model, read_clip_checkpoint

ABSENT = ["omegaconf", "omegaconf.listconfig", "omegaconf.dictconfig", "strhub", "strhub.models",
          "strhub.models.utils"]


class ListConfig(list):
    """Shaped like omegaconf's: a list subclass with metadata (pickled with APPENDS and BUILD)."""

    def __init__(self, content):
        super().__init__(content)
        self._metadata = {"ref_type": "typing.Any", "optional": True}


class DictConfig:
    def __init__(self, content):
        self._content, self._parent = content, None


class WarmupCosine:
    """A scheduler helper of the authors' package; Lightning stored a reference to one of its methods."""

    def anneal(self, start, end, pct):
        return end + (start - end) / 2 * pct


class RunsCode:
    """A hostile object: unpickling it would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def made_elsewhere():
    """Registers the packages an authors' checkpoint names while it is written, and removes them after, so
    loading happens where omegaconf and the authors' package do not exist."""
    placed = {"omegaconf.listconfig": {"ListConfig": ListConfig}, "omegaconf.dictconfig": {"DictConfig": DictConfig},
              "strhub.models.utils": {"WarmupCosine": WarmupCosine}}
    for name in ABSENT:
        module = types.ModuleType(name)
        for attr, obj in placed.get(name, {}).items():
            setattr(module, attr, obj)
            obj.__module__, obj.__qualname__ = name, attr
        sys.modules[name] = module
    yield
    for name in ABSENT:
        sys.modules.pop(name, None)


def _authors_ckpt(state, path, extra=None):
    """A checkpoint laid out as the authors' Lightning 1.6 training saves it."""
    doc = {"epoch": 9, "global_step": 165_000, "pytorch-lightning_version": "1.6.5",
           "state_dict": state,
           "hyper_parameters": {"img_size": ListConfig([224, 224]), "charset_train": "0123456789abc",
                                "clip_pretrained": DictConfig({"name": "ViT-B-16"}), "max_label_length": 25},
           "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 10}}}},
           "callbacks": {"ModelCheckpoint{'monitor': 'val_accuracy'}": {"best_model_score": torch.tensor(96.1)}},
           "optimizer_states": [{"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                                 "param_groups": [{"lr": 1e-4, "params": [0]}]}],
           "lr_schedulers": [{"anneal_func": WarmupCosine().anneal, "total_steps": 165_000}],
           **(extra or {})}
    torch.save(doc, path)
    return path


def test_an_authors_lightning_checkpoint_converts_and_reads_as_the_fixture(parity_dir, tmp_path, made_elsewhere):
    state = load_file(str(parity_dir / "weights.safetensors"))
    ckpt = _authors_ckpt(state, tmp_path / "clip4str_base16x16_d70bde1f2d.ckpt")
    for name in ABSENT:
        sys.modules.pop(name)
    assert main(["convert", str(ckpt), str(tmp_path / "ours")]) == 0
    assert not any(name in sys.modules for name in ABSENT)  # nothing the file names was imported
    inputs = load_file(str(parity_dir / "inputs.safetensors"))
    outputs = load_file(str(parity_dir / "outputs.safetensors"))
    for model in (load_model(tmp_path / "ours"), Recognizer.from_pretrained(ckpt).model):
        with torch.inference_mode():  # the fixed-length path: every position of the refined logits is computed
            logits = model.eval().decode(inputs["pixel_values"], max_length=25, early_exit=False).logits
        torch.testing.assert_close(logits, outputs["final_logits_max_length25"], atol=1e-5, rtol=0)


def test_what_else_the_checkpoint_holds_comes_back_inert(tmp_path, made_elsewhere):
    path = _authors_ckpt({"visual_decoder.head.weight": torch.ones(2, 2)}, tmp_path / "x.ckpt")
    legacy = tmp_path / "legacy.ckpt"
    torch.save(torch.load(path, weights_only=False), legacy, _use_new_zipfile_serialization=False)
    for name in ABSENT:
        sys.modules.pop(name)
    for f in (path, legacy):
        doc = load_untrusted(f)
        torch.testing.assert_close(doc["state_dict"]["visual_decoder.head.weight"], torch.ones(2, 2))
        img_size = doc["hyper_parameters"]["img_size"]
        assert isinstance(img_size, Inert) and img_size.qualified_name == "omegaconf.listconfig.ListConfig"
        assert img_size.items == [224, 224]
        assert isinstance(doc["lr_schedulers"][0]["anneal_func"], Inert)  # getattr(...) was not called
        assert doc["callbacks"]["ModelCheckpoint{'monitor': 'val_accuracy'}"]["best_model_score"].item() == \
            pytest.approx(96.1)


@pytest.mark.parametrize("kind", ["authors", "clip"])
def test_a_pickle_that_would_run_a_command_does_not(tmp_path, kind):
    marker = tmp_path / "ran"
    path = tmp_path / ("model.ckpt" if kind == "authors" else "clip.bin")
    torch.save({"state_dict": {"visual_decoder.head.weight": torch.zeros(1)}, "x": RunsCode(marker),
                "y": [RunsCode(marker)]}, path)
    with pytest.raises(ValueError):
        if kind == "authors":
            Recognizer.from_pretrained(path)
        else:
            read_clip_checkpoint(path)
    assert not marker.exists()
    assert isinstance(load_untrusted(path)["x"], Inert) and not marker.exists()


def _legacy_file(path, payload: bytes) -> None:
    """A legacy-format (pre-zip) torch.save file whose object pickle is `payload` (raw pickle opcodes)."""
    magic = 0x1950A86A20F9469CFC6C
    header = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    with open(path, "wb") as f:
        for part in (magic, 1001, header):
            f.write(pickle.dumps(part, protocol=2))
        f.write(payload)
        f.write(pickle.dumps([], protocol=2))  # the storage keys


def test_a_pickle_cannot_change_an_allowed_class(tmp_path):
    # BUILD with slot state on the class itself: setattr(collections.Counter, "most_common", _codecs.encode)
    name = b"most_common"
    payload = (b"\x80\x02ccollections\nCounter\nN}X" + struct.pack("<I", len(name)) + name
               + b"c_codecs\nencode\ns\x86b0}.")
    _legacy_file(tmp_path / "patch.pt", payload)
    before = collections.Counter.most_common
    with pytest.raises(pickle.UnpicklingError, match="Counter"):
        load_untrusted(tmp_path / "patch.pt")
    assert collections.Counter.most_common is before
    with pytest.raises(ValueError, match="patch.pt"):
        Recognizer.from_pretrained(tmp_path / "patch.pt")
    assert collections.Counter.most_common is before


def test_errors_name_the_file_as_what_was_asked_for(tmp_path):
    torch.save({"state_dict": {"visual_decoder.head.weight": torch.zeros(8, 8)}}, tmp_path / "x.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "x.ckpt").read_bytes()[:300])
    with pytest.raises(ValueError) as err:
        read_authors_state(tmp_path / "cut.ckpt")
    assert str(err.value).startswith("authors' checkpoint") and "truncated" in str(err.value)
    assert "\n" not in str(err.value)
    (tmp_path / "cut.bin").write_bytes((tmp_path / "x.ckpt").read_bytes()[:300])
    with pytest.raises(ValueError) as err:
        read_clip_checkpoint(tmp_path / "cut.bin")
    assert str(err.value).startswith("CLIP checkpoint") and "\n" not in str(err.value)


HOSTILE_SCRIPT = '''
from typing import Tuple

import torch


class Hostile(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        marker = torch.from_file(MARKER, True, 16, dtype=torch.uint8)  # creates and writes any file
        self.weight = torch.add(state[0], torch.sum(marker.fill_(65)), alpha=0)  # used, so never optimised away
        self.training = state[1]
'''


@pytest.mark.parametrize("use", ["clip", "authors", "read"])
def test_a_torchscript_archive_is_read_without_running_its_code(tmp_path, monkeypatch, use):
    """TorchScript archives (OpenAI's CLIP files) carry Python that torch.jit.load compiles and runs; torch.load
    hands such files to it too. This one's __setstate__ writes a file, as it would on torch.jit.load."""
    import importlib
    import warnings

    marker = tmp_path / "written"
    (tmp_path / f"hostile_{use}.py").write_text(HOSTILE_SCRIPT.replace("MARKER", repr(str(marker))))
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(importlib.import_module(f"hostile_{use}").Hostile())
        torch.jit.save(scripted, str(tmp_path / "clip.pt"))
    torch.jit.load(str(tmp_path / "clip.pt"))  # what the file does where its code runs
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="clip.pt"):
        if use == "clip":
            read_clip_checkpoint(tmp_path / "clip.pt")
        elif use == "authors":
            read_authors_state(tmp_path / "clip.pt")
        else:
            Recognizer.from_pretrained(tmp_path / "clip.pt")
    assert not marker.exists()


def test_a_torchscript_archives_state_dict_is_its_parameters_and_buffers(tmp_path):
    """Read from the pickled modules, named as jit's state_dict names them: nested, mangled and container
    modules; a plain tensor attribute (OpenAI's attn_mask) is not part of it."""
    import warnings

    from clip4str.untrusted import load_torchscript_tensors

    class Block(torch.nn.Module):
        def __init__(self, n: int):
            super().__init__()
            self.fc = torch.nn.Linear(n, n)
            self.attn_mask = torch.ones(n)  # a plain attribute, pickled but not in the state dict
            self.register_buffer("scale", torch.full((1,), 2.0))

        def forward(self, x):
            return self.fc(x) * self.scale * self.attn_mask

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Sequential(Block(4), Block(4), torch.nn.LayerNorm(4))
            self.proj = torch.nn.Parameter(torch.randn(4, 3))
            self.head = torch.nn.Linear(3, 2)  # another Linear: TorchScript mangles its class name

        def forward(self, x):
            return self.head(self.blocks(x) @ self.proj)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Net(), torch.randn(1, 4))
        torch.jit.save(traced, str(tmp_path / "net.pt"))
        expected = torch.jit.load(str(tmp_path / "net.pt")).state_dict()
    state = load_torchscript_tensors(tmp_path / "net.pt")
    assert sorted(state) == sorted(expected) and "blocks.0.attn_mask" not in state
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value)


def test_bytes_after_a_torchscript_archive_do_not_send_it_to_torch_jit_load(tmp_path, monkeypatch):
    """Python's zipfile reads a file with 'PK\\x05\\x06' appended as no zip, PyTorch's reader as the archive it is:
    the decision follows PyTorch's reader, so the archive never reaches torch.load's torch.jit.load."""
    import importlib
    import warnings

    marker = tmp_path / "written"
    (tmp_path / "hostile_tail.py").write_text(HOSTILE_SCRIPT.replace("MARKER", repr(str(marker))))
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(importlib.import_module("hostile_tail").Hostile()), str(tmp_path / "t.pt"))
    with open(tmp_path / "t.pt", "ab") as f:
        f.write(b"PK\x05\x06")
    with pytest.raises(ValueError, match="t.pt"):
        read_clip_checkpoint(tmp_path / "t.pt")
    with pytest.raises(ValueError):
        load_untrusted(tmp_path / "t.pt")
    assert not marker.exists()
