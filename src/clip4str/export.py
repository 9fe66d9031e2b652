"""ONNX export: the model as separate graphs (image encoder, decoders, text encoder) plus a JSON config.

CLIP's BPE tokenization between the branches cannot live in a graph, and neither can the greedy loop's
early exit; `clip4str.onnx_backend` runs both in NumPy around the graphs.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import open_clip
import torch
from torch import nn

from clip4str.bpe import VOCAB_NAME
from clip4str.destinations import check_onnx_destination
from clip4str.model import CLIP4STR
from clip4str.model.decoder import Decoder
from clip4str.onnx_backend import CROSS_DECODER, CTC_HEAD, GRAPHS, IMAGE_DECODER, IMAGE_ENCODER, TEXT_ENCODER

ONNX_FORMAT = "clip4str-onnx-v1"


class _ImageEncoder(nn.Module):
    def __init__(self, model: CLIP4STR) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class _TextEncoder(nn.Module):
    def __init__(self, model: CLIP4STR) -> None:
        super().__init__()
        self.model = model

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        from clip4str.model.towers import encode_text_tokens

        features = encode_text_tokens(self.model.clip, token_ids)
        return self.model.text_peft(features) if self.model.text_peft is not None else features


class _CtcHead(nn.Module):
    def __init__(self, model: CLIP4STR) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        from clip4str.model.ctc import column_log_probs

        return column_log_probs(self.model.ctc_head, image_tokens, self.model.clip.visual.grid_size)


class _DecoderStep(nn.Module):
    """Decoder with explicit query positions and boolean masks (True = hidden) as graph inputs."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, tgt_in: torch.Tensor, memory: torch.Tensor, query_pos: torch.Tensor,
                query_mask: torch.Tensor, content_mask: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        query = self.decoder.pos_queries[0].index_select(0, query_pos).unsqueeze(0)
        return self.decoder.run(tgt_in, memory, query, content_mask, padding_mask, query_mask)


def _export(module: nn.Module, args: tuple, path: Path, names: list[str], output: str, dynamic: dict) -> None:
    # The exporter restores the wrapper's training flag afterwards, recursively: a fresh wrapper is in train
    # mode and would leave the model in train mode (dropout on) unless it is put in eval mode first.
    module.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's fused inference kernel has no ONNX form: trace the plain computation.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=names, output_names=[output],
                              dynamic_axes=dynamic, opset_version=17, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def store_weights_fp16(path: Path, min_size: int = 1024) -> None:
    """Keep a graph's float32 weights as float16 in the file, each cast back to float32 by a Cast node that ONNX
    Runtime folds when it loads the graph: half the file, the same float32 arithmetic. Lossless for weights that
    were float16 to begin with (the built-in model's)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < min_size:
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), f"{name}__fp16"))
        casts.append(onnx.helper.make_node("Cast", [f"{name}__fp16"], [name], to=onnx.TensorProto.FLOAT,
                                           name=f"{name}__to_fp32"))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(graph_model, str(path))


@torch.no_grad()
def export_onnx(model: CLIP4STR, out_dir: str | Path, fp16_weights: bool = False, source_sha256: str | None = None,
                force: bool = False) -> Path:
    """Write image_encoder.onnx, image_decoder.onnx, [cross_decoder.onnx, text_encoder.onnx], [ctc_head.onnx],
    config.json. fp16_weights: store weights as float16 (`store_weights_fp16`); source_sha256: the hash of the
    weights file exported, recorded so that a stale export can be told from a current one. A folder holding an
    export already is replaced only with `force`; one holding a PyTorch checkpoint never."""
    out = Path(out_dir)
    check_onnx_destination(out, force)
    out.mkdir(parents=True, exist_ok=True)
    for stale in GRAPHS:  # a graph the new model lacks (a CTC head) must not outlive the export
        (out / stale).unlink(missing_ok=True)
    model = model.float().eval()
    cfg = model.config
    h, w = cfg.image_size
    images = torch.randn(2, 3, h, w)
    _export(_ImageEncoder(model), (images,), out / IMAGE_ENCODER, ["images"], "image_tokens",
            {"images": {0: "batch"}, "image_tokens": {0: "batch"}})
    memory = model.encode_image(images)
    if model.ctc_head is not None:  # the runaway guard's reading
        _export(_CtcHead(model), (memory,), out / CTC_HEAD, ["image_tokens"], "log_probs",
                {"image_tokens": {0: "batch"}, "log_probs": {0: "batch"}})
    tgt = torch.tensor([[model.tokenizer.bos_id, 1, 2], [model.tokenizer.bos_id, 3, 4]])
    step_args = (tgt, memory, torch.tensor([0, 1]), torch.zeros(2, 3, dtype=torch.bool),
                 torch.zeros(3, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool))
    names = ["tgt_in", "memory", "query_pos", "query_mask", "content_mask", "padding_mask"]
    dynamic = {"tgt_in": {0: "batch", 1: "length"}, "memory": {0: "batch", 1: "tokens"},
               "query_pos": {0: "queries"}, "query_mask": {0: "queries", 1: "length"},
               "content_mask": {0: "length", 1: "length"}, "padding_mask": {0: "batch", 1: "length"},
               "logits": {0: "batch", 1: "queries"}}
    _export(_DecoderStep(model.image_decoder), step_args, out / IMAGE_DECODER, names, "logits", dynamic)
    if model.cross_decoder is not None:
        ids = torch.zeros(2, cfg.text_context_length, dtype=torch.long)
        _export(_TextEncoder(model), (ids,), out / TEXT_ENCODER, ["token_ids"], "text_features",
                {"token_ids": {0: "batch"}, "text_features": {0: "batch"}})
        cross_mem = torch.cat([memory, model.encode_text(["ab", "c"], memory.device)], dim=1)
        _export(_DecoderStep(model.cross_decoder), (tgt, cross_mem, *step_args[2:]), out / CROSS_DECODER,
                names, "logits", dynamic)
        shutil.copy(Path(open_clip.__file__).parent / VOCAB_NAME, out / VOCAB_NAME)
    tok = model.tokenizer
    if fp16_weights:
        for graph in out.glob("*.onnx"):
            store_weights_fp16(graph)
    doc = {"format": ONNX_FORMAT, "model": cfg.to_dict(), "itos": list(tok.itos),
           "eos_id": tok.eos_id, "bos_id": tok.bos_id, "pad_id": tok.pad_id,
           "provenance": getattr(model, "provenance", {}), "source_sha256": source_sha256}
    (out / "config.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
