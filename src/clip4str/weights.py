"""Checkpoints: our format (safetensors + JSON config) and CLIP weights from local OpenAI/open_clip files."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from clip4str.destinations import check_checkpoint_destination
from clip4str.errors import first_line
from clip4str.model.clip4str import CLIP4STR
from clip4str.model_config import ModelConfig
from clip4str.untrusted import is_torchscript, load_torchscript_tensors, load_untrusted

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
FORMAT = "clip4str-checkpoint-v1"
# Keys that OpenAI's released CLIP archives carry beside the weights.
OPENAI_MARKERS = ("input_resolution", "context_length", "vocab_size")


# -- our checkpoint format ------------------------------------------------------------------------------
def save_checkpoint(model: CLIP4STR, path: str | Path, provenance: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """Write `model` as a folder holding config.json and model.safetensors; returns the folder.

    `dtype` (e.g. torch.float16) stores floating-point weights smaller; loading casts them back to float32.
    A folder that holds a checkpoint already is replaced only with `force`; one with ONNX graphs never.
    """
    folder = Path(path)
    check_checkpoint_destination(folder, force)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().to(dtype if dtype is not None and v.is_floating_point() else v.dtype)
               .contiguous() for k, v in model.state_dict().items()}
    doc = {"format": FORMAT, "model": model.config.to_dict(), "provenance": provenance or {}}
    (folder / CONFIG_NAME).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": FORMAT})
    # safetensors creates the file readable by its owner only, whatever the umask: a service account or a
    # colleague could read config.json but not the weights. They get config.json's mode (the umask's).
    os.chmod(folder / WEIGHTS_NAME, (folder / CONFIG_NAME).stat().st_mode & 0o777)
    return folder


def read_checkpoint_config(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The JSON document and weights path of a checkpoint folder (or its config.json / model.safetensors)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist; give a folder made by clip4str "
                                "(config.json + model.safetensors)")
    if p.is_file() and p.name not in (CONFIG_NAME, WEIGHTS_NAME):
        raise ValueError(f"checkpoint {str(p)!r} is a file, not a clip4str checkpoint folder (config.json + "
                         "model.safetensors); give the folder")
    folder = p if p.is_dir() else p.parent
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if any(folder.glob("*.onnx")):  # graphs beside config.json: `clip4str export onnx` made this folder
        raise ValueError(f"{str(folder)!r} is an ONNX export, not a PyTorch checkpoint; read it with "
                         "--backend onnx (Python: clip4str.onnx_backend.OnnxRecognizer)")
    for needed in (config_path, weights_path):
        if not needed.is_file():
            run = (folder / "final").is_dir() or (folder / "last.ckpt").is_file()
            hint = (f"; this looks like a training run's folder: its model is in {str(folder / 'final')!r} (or "
                    "export last.ckpt with `clip4str train --config CONFIG --export-last DIR`)") if run else ""
            raise FileNotFoundError(f"checkpoint {str(folder)!r} has no {needed.name}; a clip4str checkpoint is "
                                    f"a folder with config.json and model.safetensors{hint}")
    try:
        doc = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON ({e}); the checkpoint is damaged") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("model"), dict):
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{config_path} is not a clip4str checkpoint config (format {found!r}, or no model "
                         "section)")
    return doc, weights_path


def model_config(doc: dict[str, Any], config_path: Path) -> ModelConfig:
    """The model section of a checkpoint config, with an error naming the file where a value is wrong."""
    try:
        return ModelConfig.from_dict(doc["model"])
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        reason = first_line(e, 200)
        raise ValueError(f"{config_path}: the model settings are invalid ({reason}); the checkpoint is damaged "
                         "or not made by this version of clip4str") from e


def load_model(path: str | Path, device: str | torch.device = "cpu") -> CLIP4STR:
    """Load a CLIP4STR checkpoint folder in eval mode; needs no other file."""
    doc, weights_path = read_checkpoint_config(path)
    config = model_config(doc, weights_path.parent / CONFIG_NAME)
    try:
        with safe_open(str(weights_path), "pt") as f:  # the header alone: names and shapes
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
        with torch.device("meta"):  # the config's shapes without allocating them: a config.json from elsewhere
            check_fits(CLIP4STR(config), shapes, str(weights_path))  # must describe the weights beside it
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path} could not be read ({e}); the file is truncated or not safetensors") from e
    damaged = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if damaged:  # every reading would be NaN (and `--format json` would print NaN, which is not JSON)
        raise ValueError(f"{weights_path}: tensor {damaged} holds NaN or infinite values; the checkpoint is damaged "
                         "(saved from a run whose loss diverged?)")
    model = CLIP4STR(config)
    load_exact(model, state, str(weights_path))
    model.provenance = doc.get("provenance", {})
    return model.to(device).eval()


def load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict that must match `module` key for key and shape for shape."""
    check_fits(module, state, source)
    expected = module.state_dict()
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def check_fits(module: torch.nn.Module, state: dict[str, torch.Tensor | tuple[int, ...]], source: str) -> None:
    """Raise ValueError unless `state` (tensors or their shapes) matches `module`'s state dict key for key and shape
    for shape."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    given = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in state.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
    if missing or unexpected or wrong:
        parts = [f"{name}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError(f"{source} does not fit this model ({'; '.join(parts)})")


# -- CLIP weights from local files ------------------------------------------------------------------------
@dataclass
class ClipWeights:
    """A CLIP state dict in open_clip key names, its family and the tower config inferred from shapes."""

    state_dict: dict[str, torch.Tensor]
    family: str  # 'openai' or 'open_clip'
    config: dict[str, Any]


def read_tensors(path: Path, kind: str = "CLIP checkpoint") -> tuple[dict[str, Any], bool]:
    """(state dict, came from a TorchScript archive) of an external file, read without running code from it
    (`clip4str.untrusted`); `kind` names the file in errors as what the caller asked for."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path)), False
        if is_torchscript(path):  # OpenAI's CLIP releases: tensors read from the archive, its code never run
            return load_torchscript_tensors(path), True
        obj = load_untrusted(path)
    except Exception as e:  # torch/safetensors raise many types for a damaged file
        reason = first_line(e)
        raise ValueError(f"{kind} {str(path)!r} could not be read ({reason}); the file is truncated or not a "
                         "PyTorch (.pt/.bin/.ckpt), TorchScript or safetensors file") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning and open_clip training checkpoints
    if not isinstance(obj, dict):
        raise ValueError(f"{kind} {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return obj, False


def count_blocks(state: dict[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def infer_clip_config(state: dict[str, torch.Tensor], quick_gelu: bool) -> dict[str, Any]:
    """open_clip tower config of a ViT CLIP state dict, read from tensor shapes alone."""
    required = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
                "positional_embedding", "ln_final.weight", "text_projection")
    missing = [k for k in required if k not in state]
    if missing:
        hint = " It looks like a CLIP4STR/PARSeq checkpoint: use `clip4str convert`." if any(
            k.startswith(("clip_model.", "visual_decoder.", "decoder.", "encoder.")) for k in state) else ""
        raise ValueError(f"not a ViT CLIP state dict: missing {', '.join(missing)}.{hint}")
    conv = state["visual.conv1.weight"]
    width, patch = conv.shape[0], tuple(conv.shape[2:])
    grid = state["visual.positional_embedding"].shape[0] - 1
    side = round(grid ** 0.5)
    if side * side != grid or patch[0] != patch[1]:
        raise ValueError(f"cannot infer the image size of a non-square ViT ({grid} patches of {patch})")
    text_width = state["ln_final.weight"].shape[0]
    return {
        "embed_dim": int(state["text_projection"].shape[1]),
        "quick_gelu": quick_gelu,
        "vision_cfg": {
            "image_size": side * patch[0], "patch_size": patch[0], "width": width,
            "layers": count_blocks(state, "visual.transformer.resblocks."),
            # Head count is invisible in the shapes: 64-wide heads, except the 16 heads of ViT-H and larger.
            "head_width": width // 16 if width >= 1280 else 64,
            "mlp_ratio": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        },
        "text_cfg": {
            "context_length": int(state["positional_embedding"].shape[0]),
            "vocab_size": int(state["token_embedding.weight"].shape[0]),
            "width": text_width, "heads": max(1, text_width // 64),
            "layers": count_blocks(state, "transformer.resblocks."),
            "mlp_ratio": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
        },
    }


def read_clip_checkpoint(path: str | Path, quick_gelu: bool | None = None) -> ClipWeights:
    """Read a local CLIP file: OpenAI (TorchScript archive or state dict) or open_clip (.pt/.bin/.safetensors).

    The activation follows the weights' family: QuickGELU for OpenAI weights (TorchScript archive, OpenAI's
    metadata keys, or OpenAI's fp16 layout), GELU for open_clip ones unless an `open_clip_config.json` beside
    the file says otherwise; `quick_gelu` overrides both.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {str(p)!r} does not exist")
    raw, scripted = read_tensors(p)
    state = {k.removeprefix("module."): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    fp16_layout = state.get("visual.conv1.weight", torch.empty(0)).dtype == torch.float16 and \
        state.get("ln_final.weight", torch.empty(0)).dtype == torch.float32
    openai = scripted or any(k in raw for k in OPENAI_MARKERS) or fp16_layout
    for key in (*OPENAI_MARKERS, "attn_mask"):  # metadata and the causal-mask buffer, not weights
        state.pop(key, None)
    sidecar = p.parent / "open_clip_config.json"
    if quick_gelu is None:
        quick_gelu = openai
        if not openai and sidecar.is_file():
            try:
                doc = json.loads(sidecar.read_text(encoding="utf-8"))
                quick_gelu = bool(doc.get("model_cfg", {}).get("quick_gelu", False))
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON or Unicode errors, wrong shape
                raise ValueError(f"{sidecar} is not an open_clip config ({type(e).__name__}: {e}); fix or remove "
                                 "it (it only says whether the model uses QuickGELU)") from e
    state = {k: v.float() for k, v in state.items()}
    return ClipWeights(state, "openai" if openai else "open_clip", infer_clip_config(state, quick_gelu))


# -- ImageNet ViT weights (timm or torchvision) for the image tower -------------------------------------------
_TIMM_BLOCK = {"norm1": "ln_1", "attn.qkv": "attn.in_proj", "attn.proj": "attn.out_proj", "norm2": "ln_2",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_TV_BLOCK = {"ln_1": "ln_1", "self_attention.in_proj": "attn.in_proj", "self_attention.out_proj": "attn.out_proj",
             "ln_2": "ln_2", "mlp.0": "mlp.c_fc", "mlp.3": "mlp.c_proj", "mlp.linear_1": "mlp.c_fc",
             "mlp.linear_2": "mlp.c_proj"}


def _rename_block(key: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        for suffix in ("weight", "bias"):
            if key == f"{src}.{suffix}" or (src.endswith("in_proj") and key == f"{src}_{suffix}"):
                return f"{dst}_{suffix}" if dst.endswith("in_proj") else f"{dst}.{suffix}"
    return None


def read_imagenet_vit(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A timm or torchvision ImageNet ViT state dict -> (open_clip visual-tower keys, vision_cfg from shapes).

    The patch-embedding bias (CLIP's stem has none) is folded into the patch positions' embeddings, which
    computes the same thing. ImageNet ViTs have no pre-norm, so the tower is built with `no_ln_pre`.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ImageNet ViT checkpoint {str(p)!r} does not exist")
    raw, _ = read_tensors(p)
    raw = raw.get("model", raw) if isinstance(raw.get("model"), dict) else raw
    if "patch_embed.proj.weight" in raw:  # timm
        stem, cls, pos, norm = "patch_embed.proj", raw["cls_token"], raw["pos_embed"], "norm"
        block_re, table = re.compile(r"blocks\.(\d+)\.(.+)"), _TIMM_BLOCK
    elif "conv_proj.weight" in raw:  # torchvision
        stem, cls, pos, norm = "conv_proj", raw["class_token"], raw["encoder.pos_embedding"], "encoder.ln"
        block_re, table = re.compile(r"encoder\.layers\.encoder_layer_(\d+)\.(.+)"), _TV_BLOCK
    else:
        raise ValueError(f"{p} is not a timm or torchvision ViT state dict (no patch_embed.proj / conv_proj)")
    conv = raw[f"{stem}.weight"].float()
    pos = pos.float().reshape(-1, conv.shape[0]).clone()
    if f"{stem}.bias" in raw:
        pos[1:] += raw[f"{stem}.bias"].float()
    state = {"conv1.weight": conv, "class_embedding": cls.float().reshape(-1), "positional_embedding": pos,
             "ln_post.weight": raw[f"{norm}.weight"].float(), "ln_post.bias": raw[f"{norm}.bias"].float()}
    layers = set()
    for key, value in raw.items():
        m = block_re.fullmatch(key)
        if m and (name := _rename_block(m.group(2), table)):
            state[f"transformer.resblocks.{m.group(1)}.{name}"] = value.float()
            layers.add(int(m.group(1)))
    width = conv.shape[0]
    cfg = {"width": width, "layers": len(layers), "patch_size": list(conv.shape[2:]), "head_width": 64,
           "mlp_ratio": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width, "no_ln_pre": True}
    return state, cfg


def fit_positions(pos: torch.Tensor, grid: tuple[int, int], source: tuple[int, int] | None = None) -> torch.Tensor:
    """Resize a (1 + H*W, D) positional embedding from grid `source` (square if None) to `grid` (bicubic),
    class token kept."""
    n = pos.shape[0] - 1
    source = tuple(source) if source is not None else (round(n ** 0.5),) * 2
    if source[0] * source[1] != n:
        raise ValueError(f"a positional embedding of {n} patches does not fit a {source[0]}x{source[1]} grid")
    if source == tuple(grid):
        return pos
    patches = pos[1:].reshape(1, source[0], source[1], -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches.float(), size=grid, mode="bicubic", align_corners=False)
    patches = patches.to(pos.dtype)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


# The parts of a CLIP residual block that write into its residual stream.
_BLOCK_OUTPUTS = ("attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


def add_identity_blocks(state: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], prefix: str, have: int,
                        want: int) -> dict[str, torch.Tensor]:
    """`state` of a tower with `have` residual blocks under `prefix` (e.g. 'clip.visual.transformer.resblocks.'),
    grown to `want` blocks: the new ones come from `fresh` (a new model's initialisation) with the projections that
    write into the residual stream zeroed, so each adds nothing and the deeper tower computes what the
    checkpoint's did until training grows them."""
    out = dict(state)
    for i in range(have, want):
        block = f"{prefix}{i}."
        for key, value in fresh.items():
            if key.startswith(block):
                out[key] = torch.zeros_like(value) if key[len(block):] in _BLOCK_OUTPUTS else value.clone()
    return out
