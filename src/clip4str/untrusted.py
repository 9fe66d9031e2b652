"""Reading checkpoints made elsewhere (the authors' Lightning `.ckpt` files, CLIP `.pt`/`.bin` files) without
running code from them and without the packages that made them.

A Lightning checkpoint of the authors' training holds, beside its tensors, Hydra/OmegaConf hyper-parameters
(`omegaconf.listconfig.ListConfig`, `DictConfig`), Lightning's loop and callback states and scheduler entries
that reference methods. PyTorch's weights-only unpickler refuses every such global. Here each global the file
names that PyTorch's weights-only loader does not allow is replaced by an inert stand-in class of that name:
building one only records its arguments and state, so nothing the pickle names is imported or called (an
`os.system` in a hostile file becomes a stand-in too), while tensors are rebuilt by PyTorch's allow-listed
functions. TorchScript archives (OpenAI's CLIP files) are read the same way: their code is never compiled or run.
"""

from __future__ import annotations

import _compat_pickle
import functools
import pickle
import re
import types
from pathlib import Path
from typing import Any

import torch


class Inert:
    """Stand-in for a global of an untrusted pickle: keeps its call arguments, items and state, does nothing."""

    qualified_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.items, self.state = args, kwargs, [], None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # A stand-in made by NEWOBJ (__new__ without __init__) has no attributes yet: hence the setdefault.
    def append(self, item: Any) -> None:  # a list subclass's APPENDS
        self.__dict__.setdefault("items", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("items", []).extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:  # a dict subclass's SETITEMS
        self.__dict__.setdefault("items", []).append((key, value))

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


@functools.cache
def _stand_in(name: str) -> type[Inert]:
    return type(name.rsplit(".", 1)[-1], (Inert,), {"qualified_name": name})


@functools.cache
def _allowed() -> dict[str, Any]:
    """The globals PyTorch's weights-only loader allows (tensor and storage rebuilding, dtypes, plain
    containers): they are what a checkpoint's tensors need, and calling them runs no code from the file."""
    from torch import _weights_only_unpickler

    return dict(_weights_only_unpickler._get_allowed_globals())


class _Unpickler(pickle._Unpickler):
    # The pure-Python unpickler, for its opcode table: BUILD (set an object's state) must not reach the globals
    # themselves, or a file could replace a method of an allowed class for the rest of the process.
    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self) -> None:
        target = self.stack[-2]  # below the state on the stack
        if not isinstance(target, (Inert, dict, torch.Tensor)):  # what checkpoints build: stand-ins, dicts, tensors
            name = getattr(target, "__qualname__", type(target).__qualname__)
            raise pickle.UnpicklingError(f"it sets the state of {name}, which no checkpoint does")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str) -> Any:
        # torch.save writes protocol 2, which names Python 2 modules (__builtin__.set); those names never occur
        # in Python 3 pickles, so mapping them always is what pickle's own fix_imports does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = f"{module}.{name}"
        return _allowed().get(key) or _stand_in(key)


# torch.load takes the unpickler from a "pickle module" (and adds its own handling of tensor storages).
_restricted_pickle = types.ModuleType("clip4str_restricted_pickle")
_restricted_pickle.Unpickler = _Unpickler
_restricted_pickle.load = lambda file, **kwargs: _Unpickler(file, **kwargs).load()


def load_untrusted(path: str | Path) -> Any:
    """The object a `torch.save` file (zip or legacy format) holds, with tensors, plain containers and inert
    stand-ins for every other global; a TorchScript archive's state dict (`load_torchscript_tensors`). Raises
    what `torch.load` raises for a file that is no PyTorch checkpoint."""
    if is_torchscript(path):  # torch.load would run it through torch.jit.load
        return load_torchscript_tensors(path)
    # weights_only=False only hands the pickle to our unpickler instead of PyTorch's: every global still
    # goes through _Unpickler.find_class.
    return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)


def _torch_records(path: str | Path) -> list[str] | None:
    """The record names of a zip as PyTorch reads it (its own reader, which `torch.load` uses to decide what a file
    is; Python's zipfile may disagree on a file with bytes appended), or None for a file that is no such zip."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.load's own test for its zip format
            return None
    try:
        return list(torch._C.PyTorchFileReader(str(path)).get_all_records())
    except Exception:  # damaged: torch.load fails on it too, in one line from the caller
        return None


def is_torchscript(path: str | Path) -> bool:
    """Whether a file is a TorchScript archive (code/ or constants.pkl inside), such as OpenAI's CLIP files."""
    records = _torch_records(path) or []
    return any(r.split("/")[-1] == "constants.pkl" or r.startswith("code/") or "/code/" in r for r in records)


# `class Linear(Module):` and, in its body, `__parameters__ = ["weight", "bias", ]` / `__buffers__ = [...]`.
_CLASS = re.compile(r"^class (\w+)\(.*?\):\n((?:[ \t]+.*\n|\n)*)", re.M)
_NAMES = re.compile(r"^\s+__(parameters|buffers)__ = \[([^\]]*)\]", re.M)


MAX_CODE_BYTES = 16 << 20  # a code file of OpenAI's ViT-L/14 archive is under 100 kB


def _tensor_names(reader: Any) -> dict[str, set[str]]:
    """Each TorchScript class's parameter and buffer names, read from the declarations in its code files (read as
    text: what a module's state dict holds, without the plain tensor attributes it also pickles)."""
    names: dict[str, set[str]] = {}
    for entry in reader.get_all_records():
        rest = entry.removeprefix("code/") if entry.startswith("code/") else entry.partition("/code/")[2]
        if not rest.endswith(".py"):
            continue
        module = rest.removesuffix(".py").replace("/", ".")
        if reader.get_record_size(entry) > MAX_CODE_BYTES:  # read whole below: a zip bomb would fill memory
            raise ValueError(f"a code file of {reader.get_record_size(entry)} bytes in a TorchScript archive")
        text = reader.get_record(entry).decode("utf-8", errors="replace")
        for cls in _CLASS.finditer(text):
            found = {n.strip().strip("\"'") for m in _NAMES.finditer(cls.group(2)) for n in m.group(2).split(",")}
            names[f"{module}.{cls.group(1)}"] = found - {""}
    return names


def load_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive, read without running its code: `torch.jit.load` (and `torch.load`,
    which hands such files to it) compiles and runs the archive's Python, whose `__setstate__` can do anything."""
    reader = torch._C.PyTorchFileReader(str(path))
    declared = _tensor_names(reader)
    root = torch.serialization._load(reader, map_location="cpu", pickle_module=_restricted_pickle)
    state: dict[str, torch.Tensor] = {}

    def walk(obj: Any, prefix: str, depth: int) -> None:
        if depth > 100 or not isinstance(obj, Inert) or not isinstance(obj.state, dict):
            return
        keep = declared.get(obj.qualified_name, set())
        for name, value in obj.state.items():
            if isinstance(value, torch.Tensor) and name in keep:
                state[prefix + name] = value
            elif isinstance(value, Inert):
                walk(value, f"{prefix}{name}.", depth + 1)

    walk(root, "", 0)
    if not state:
        raise ValueError("a TorchScript archive with no module parameters or buffers in it")
    return state
