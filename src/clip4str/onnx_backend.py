"""ONNX Runtime backend: the exported graphs driven by a NumPy decoding loop. Needs no PyTorch.

Runs outside the graphs: image decoding and preprocessing (Pillow + NumPy), the greedy loop with its
per-row early exit, refinement context building, caption extraction and CLIP BPE tokenization between the
branches, and softmax/greedy decoding of the logits. The decoding mirrors `CLIP4STR.decode`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip4str.bpe import VOCAB_NAME, BPETokenizer
from clip4str.cascade import confident_rows
from clip4str.charset import CharsetAdapter, Tokenizer, caption_updates, pass_memories
from clip4str.data.transforms import ImageInput, preprocess_array
from clip4str.draft import ctc_drafts, settle
from clip4str.errors import first_line
from clip4str.model_config import ModelConfig
from clip4str.reading import BaseRecognizer, ReadResult
from clip4str.rescore import rescore_rows
from clip4str.runaway import apply_guard, replace_rows, softmax

# The graph files of an export folder (written by clip4str.export, read here).
IMAGE_ENCODER, IMAGE_DECODER = "image_encoder.onnx", "image_decoder.onnx"
TEXT_ENCODER, CROSS_DECODER = "text_encoder.onnx", "cross_decoder.onnx"
CTC_HEAD = "ctc_head.onnx"  # only for models with a CTC head; exports made before it have no runaway guard
GRAPHS = (IMAGE_ENCODER, IMAGE_DECODER, TEXT_ENCODER, CROSS_DECODER, CTC_HEAD)
BUILTIN_ONNX = "tiny-onnx"  # the built-in model's graphs, beside its PyTorch weights in clip4str/pretrained


def default_onnx_model_path() -> Path:
    """Folder of the built-in model's ONNX export shipped inside the package."""
    return Path(__file__).parent / "pretrained" / BUILTIN_ONNX


def _causal(n: int) -> np.ndarray:
    return np.triu(np.ones((n, n), dtype=bool), 1)


@dataclass
class _Refined:
    """`clip4str.model.refine.Refined` in NumPy: a refinement computed with a draft check."""

    context: np.ndarray
    padding: np.ndarray
    logits: np.ndarray

    def holds(self, context: np.ndarray, padding: np.ndarray, width: int) -> bool:
        """Whether these are the first `width` refinement logits over `context` with `padding`."""
        return self.logits.shape[1] == width and self.context.shape == context.shape and \
            np.array_equal(self.padding, padding) and \
            np.array_equal(np.where(padding, 0, self.context), np.where(padding, 0, context))


class OnnxRecognizer(BaseRecognizer):
    """Reads text with an exported folder (`clip4str export onnx`) on ONNX Runtime.

    threads: the image encoder's (default: ONNX Runtime's, one per core); the other graphs run on one thread.
    """

    def __init__(self, folder: str | Path | None = None, providers: list[str] | None = None,
                 threads: int | None = None) -> None:
        folder = Path(folder) if folder is not None else default_onnx_model_path()
        if not (folder / "config.json").is_file() or not (folder / IMAGE_ENCODER).is_file():
            raise FileNotFoundError(f"{str(folder)!r} is not an exported model (config.json + *.onnx); "
                                    "make one with `clip4str export onnx`")
        try:
            self._load(folder, providers or ["CPUExecutionProvider"], threads)
        except Exception as e:  # bad JSON, missing keys or graphs, damaged protobuf (ONNX Runtime's own types)
            reason = first_line(e, 200)
            raise ValueError(f"{str(folder)!r} is not a readable ONNX export ({type(e).__name__}: {reason}); "
                             "export it again with `clip4str export onnx`") from e
        self.window_aspect = self._default_window()
        self.device, self.precision = "onnxruntime", "fp32"

    def _load(self, folder: Path, providers: list[str], threads: int | None) -> None:
        import onnxruntime as ort

        doc = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        self.config = ModelConfig.from_dict(doc["model"])  # every value checked, as for PyTorch checkpoints
        self.cfg = self.config.to_dict()
        self.tokenizer = Tokenizer(self.cfg["charset"])

        def session(name: str, threads: int | None = 1):  # noqa: ANN202
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads = threads
            return ort.InferenceSession(str(folder / name), opts, providers=providers)

        # Only the image encoder's products are worth splitting across cores. Every session has its own pool of
        # threads that spin between runs; with a pool each, the small graphs' spinning threads took the cores from
        # the encoder's (built-in model, 2 cores: batch-1 median 7.2 -> 4.4 ms, batch 32 9.9 -> 7.2 ms per image).
        self.image_encoder, self.image_decoder = session(IMAGE_ENCODER, threads), session(IMAGE_DECODER)
        self.cross = self.cfg["cross_branch"]
        if self.cross:
            self.text_encoder, self.cross_decoder = session(TEXT_ENCODER), session(CROSS_DECODER)
            self.bpe = BPETokenizer(folder / VOCAB_NAME)
        self.ctc_head = session(CTC_HEAD) if (folder / CTC_HEAD).is_file() else None
        self.caption_adapter = CharsetAdapter(self.cfg["caption_charset"])
        self.image_size = self.config.image_size
        self.second_look_confidence = self.cfg.get("second_look_confidence")
        # Graphs of another export beside this config.json: fail here, not at the first batch.
        graph_size = tuple(self.image_encoder.get_inputs()[0].shape[2:])
        if all(isinstance(d, int) for d in graph_size) and graph_size != self.image_size:
            raise ValueError(f"{IMAGE_ENCODER} takes {graph_size} images but config.json says {self.image_size}")
        classes = self.image_decoder.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != self.tokenizer.num_classes:
            raise ValueError(f"{IMAGE_DECODER} scores {classes} classes but config.json's charset makes "
                             f"{self.tokenizer.num_classes}")

    def preprocess(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Images -> the model's input array (the one preprocessing function, NumPy flavour)."""
        return preprocess_array(list(images), self.image_size, self.cfg["image_mean"], self.cfg["image_std"])

    # -- the graphs ---------------------------------------------------------------------------------------
    def _step(self, decoder, tgt: np.ndarray, memory: np.ndarray, query_pos: np.ndarray, query_mask: np.ndarray,
              padding: np.ndarray | None = None) -> np.ndarray:
        padding = np.zeros(tgt.shape, dtype=bool) if padding is None else padding
        feed = {"tgt_in": tgt, "memory": memory, "query_pos": query_pos.astype(np.int64), "query_mask": query_mask,
                "content_mask": _causal(tgt.shape[1]), "padding_mask": padding}
        # The exporter drops inputs a graph never reads (the content mask of a one-layer decoder).
        return decoder.run(None, {i.name: feed[i.name] for i in decoder.get_inputs()})[0]

    def _captions(self, logits: np.ndarray, lengths: np.ndarray | None = None) -> list[str]:
        return self.tokenizer.captions(logits.argmax(-1).tolist(), None if lengths is None else lengths.tolist(),
                                       self.caption_adapter)

    def _cross_memories(self, tokens: np.ndarray, passes: list[list[str]]) -> list[np.ndarray]:
        """As `CLIP4STR.cross_memories`: one text-encoder run for the first pass and every caption changed later."""
        texts, rows = caption_updates(passes)
        text = self.text_encoder.run(None, {"token_ids": self.bpe(texts, self.cfg["text_context_length"])})[0]
        first = np.concatenate([tokens, text[: len(rows[0])]], axis=1)
        return pass_memories(first, text, rows, tokens.shape[1], np.copy)

    # -- decoding (mirrors CLIP4STR.decode) ------------------------------------------------------------------
    def _first_pass(self, decoder, memory: np.ndarray, steps: int, mode: str, early_exit: bool,
                    budget: np.ndarray | None, draft: np.ndarray | None = None, refine: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, _Refined | None]:
        b, tok = memory.shape[0], self.tokenizer
        if mode == "nar":
            bos = np.full((b, 1), tok.bos_id, dtype=np.int64)
            logits = self._step(decoder, bos, memory, np.arange(steps), np.zeros((steps, 1), dtype=bool))
            return logits, np.full(b, steps), None
        stops_at_eos = budget is None
        budget = np.full(b, steps) if budget is None else budget
        tgt = np.full((b, steps), tok.pad_id, dtype=np.int64)
        tgt[:, 0] = tok.bos_id
        mask = _causal(steps)
        logits, start, ahead = [], 0, None
        if draft is not None and early_exit and budget.max() > 0:  # `clip4str.draft`
            draft = draft[:, :int(budget.max())]
            n = draft.shape[1]
            tgt[:, 1:n] = draft[:, :-1]
            queries, query_mask, padding = np.arange(n), mask[:n, :n], None
            if refine:  # the refinement of the draft's reading joins the check (`greedy.check_draft`)
                is_eos = draft == tok.eos_id
                lengths = np.minimum(np.where(is_eos.any(-1), is_eos.argmax(-1) + 1, n), budget)
                context, padding, cloze = self._refine_inputs(draft, lengths, steps)
                width = min(steps, n + 1)
                # The graph takes one padding for all queries. It hides only positions from a row's length on,
                # which its causal queries before there never see: the check settles the same (its logits
                # past a row's stop differ from torch's, and are never read).
                queries, query_mask = np.concatenate([queries, np.arange(width)]), np.vstack([query_mask,
                                                                                             cloze[:width]])
            out = self._step(decoder, tgt[:, :n], memory, queries, query_mask, padding)
            checked = out[:, :n]
            settled = settle(checked.argmax(-1), draft, budget, tok.eos_id)
            start = settled.width
            logits.append(checked[:, :start])
            tgt[:, 1:] = tok.pad_id  # the early exit below looks for EOS in all of tgt: no draft tokens left in it
            tgt[:, 1:start + 1] = checked[:, :start].argmax(-1)[:, :steps - 1]
            if settled.finished:
                start = steps
                ahead = _Refined(context, padding, out[:, n:]) if refine else None
        for i in range(start, int(budget.max())):
            j = i + 1
            out = self._step(decoder, tgt[:, :j], memory, np.array([i]), mask[i:j, :j])
            logits.append(out)
            if j < steps:
                tgt[:, j] = out[:, 0].argmax(-1)
                if early_exit and ((tgt == tok.eos_id).any(-1) | (budget <= j)).all():
                    break
        logits = np.concatenate(logits, axis=1)
        lengths = np.minimum(budget, logits.shape[1])
        if early_exit and stops_at_eos:
            is_eos = logits.argmax(-1) == tok.eos_id
            first = np.where(is_eos.any(-1), is_eos.argmax(-1) + 1, logits.shape[1])
            lengths = np.minimum(lengths, first)
        return logits, lengths, ahead

    def _refine_inputs(self, ids: np.ndarray, lengths: np.ndarray, steps: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`refine.refine_context`'s context and padding of greedy ids (B, L), and the cloze query mask (steps, L)."""
        tok = self.tokenizer
        b, length = ids.shape
        ctx = np.concatenate([np.full((b, 1), tok.bos_id, dtype=np.int64), ids[:, :-1]], axis=1)
        padding = (np.cumsum(ctx == tok.eos_id, -1) > 0) | (np.arange(length)[None] >= lengths[:, None])
        query_mask = np.zeros((steps, length), dtype=bool)
        idx = np.arange(min(steps, length - 1))
        query_mask[idx, idx + 1] = True
        return ctx, padding, query_mask

    def _refine(self, decoder, memory: np.ndarray, logits: np.ndarray, lengths: np.ndarray, steps: int,
                ahead: _Refined | None = None) -> tuple[np.ndarray, np.ndarray]:
        tok = self.tokenizer
        b, length = logits.shape[:2]
        ctx, padding, query_mask = self._refine_inputs(logits.argmax(-1), lengths, steps)
        # The queries past every row's first EOS are computed only if a row has none before them (as in torch).
        width = min(steps, length + 1)
        if ahead is not None and ahead.holds(ctx, padding, width):
            out = ahead.logits
        else:
            out = self._step(decoder, ctx, memory, np.arange(width), query_mask[:width], padding)
        if width < steps and not (out.argmax(-1) == tok.eos_id).any(-1).all():
            rest = self._step(decoder, ctx, memory, np.arange(width, steps), query_mask[width:], padding)
            out = np.concatenate([out, rest], axis=1)
        return out, np.full(b, out.shape[1])

    def decode(self, x: np.ndarray, mode: str | None = None, refine_iters: int | None = None,
               max_length: int | None = None, early_exit: bool = True, guard: bool = True, rescore: bool = True,
               draft: bool = True, cascade: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Final logits and valid lengths for preprocessed images (options as `CLIP4STR.decode`'s)."""
        mode = mode or self.cfg["decode_mode"]
        refine_iters = self.cfg["refine_iters"] if refine_iters is None else refine_iters
        limit = self.cfg["max_label_length"] if max_length is None else min(max_length, self.cfg["max_label_length"])
        steps = limit + 1
        threshold = self.cfg.get("cascade_confidence")
        rescore, draft = rescore and mode == "ar", draft and mode == "ar"
        cascade = cascade and mode == "ar" and self.cross and threshold is not None
        tokens = self.image_encoder.run(None, {"images": x.astype(np.float32)})[0]
        ctc_log_probs = None
        if self.ctc_head is not None and (guard or rescore or draft or cascade):
            ctc_log_probs = self.ctc_head.run(None, {"image_tokens": tokens})[0]
        img_draft = ctc_drafts(ctc_log_probs, self.tokenizer.eos_id) if draft and ctc_log_probs is not None else None
        refine = refine_iters > 0
        img, img_len, ahead = self._first_pass(self.image_decoder, tokens, steps, mode, early_exit, None,
                                               img_draft, refine)
        img_passes = [(img, img_len)]  # the image branch never reads the cross branch: its passes come first
        for _ in range(refine_iters):
            img, img_len = self._refine(self.image_decoder, tokens, img, img_len, steps, ahead)
            img_passes.append((img, img_len))
            ahead = None
        rows = np.arange(len(x))
        if cascade and ctc_log_probs is not None:
            probs = softmax(img.astype(np.float64))
            rows = rows[~confident_rows(probs.argmax(-1), probs.max(-1), img_len, ctc_log_probs,
                                        self.tokenizer.eos_id, threshold)]
        logits, lengths = img, img_len
        if len(rows):
            every = len(rows) == len(x)

            def part(a: np.ndarray) -> np.ndarray:  # no copies where every row goes on (no cascade)
                return a if every else a[rows]

            final, mem = (part(img), part(img_len)), None
            if self.cross:
                *final, mem = self._cross_branch(part(tokens), [(part(a), part(n)) for a, n in img_passes], steps,
                                                 mode, early_exit, draft, refine)
            if ctc_log_probs is not None and rescore:
                found = rescore_rows((final[0].argmax(-1), final[1]), (part(img).argmax(-1), part(img_len)),
                                     part(ctc_log_probs), limit, self.tokenizer.bos_id, self.tokenizer.eos_id,
                                     self.tokenizer.pad_id,
                                     lambda tgt, owner, padding: self._forced(tgt, owner, padding, part(tokens), mem))
                final = replace_rows(*final, found, self.tokenizer.eos_id)
            logits, lengths = _merge_rows(img, img_len, rows, *final)
        if ctc_log_probs is not None and guard:
            logits, lengths = apply_guard(logits, lengths, self.tokenizer.eos_id, lambda: ctc_log_probs)
        return logits, lengths

    def _cross_branch(self, tokens: np.ndarray, img_passes: list[tuple[np.ndarray, np.ndarray]], steps: int,
                      mode: str, early_exit: bool, draft: bool, refine: bool
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As `CLIP4STR._cross_branch`: logits, lengths and the last cross memory."""
        (first, first_len), *refined = img_passes
        passes = [self._captions(first, first_len)] + [self._captions(img) for img, _ in refined]
        mem, *later = self._cross_memories(tokens, passes)
        logits, lengths, ahead = self._first_pass(self.cross_decoder, mem, steps, mode, early_exit, first_len,
                                                  first.argmax(-1) if draft else None, refine)
        for new_mem in later:
            if new_mem is not mem:  # computed ahead for the old memory only
                mem, ahead = new_mem, None
            logits, lengths = self._refine(self.cross_decoder, mem, logits, lengths, steps, ahead)
            ahead = None
        return logits, lengths, mem

    def _forced(self, tgt_in: np.ndarray, owner: np.ndarray, padding: np.ndarray, tokens: np.ndarray,
                cross_memory: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Teacher-forced logits of both decoders (`clip4str.rescore.ForcedPass`)."""
        length = tgt_in.shape[1]

        def forced(decoder, memory: np.ndarray) -> np.ndarray:  # noqa: ANN001
            return self._step(decoder, tgt_in, memory[owner], np.arange(length), _causal(length), padding)

        return forced(self.image_decoder, tokens), \
            forced(self.cross_decoder, cross_memory) if cross_memory is not None else None

    def decode_tensors(self, x: np.ndarray, **options: object) -> list[ReadResult]:
        """Preprocessed images -> results."""
        logits, lengths = self.decode(x, **options)
        decoded = self.tokenizer.decode(softmax(logits.astype(np.float64)), lengths.tolist())
        return [ReadResult(d.text, d.confidence, d.char_probs) for d in decoded]


def _merge_rows(logits: np.ndarray, lengths: np.ndarray, rows: np.ndarray, part_logits: np.ndarray,
                part_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, lengths) with `rows` replaced by a part's (`clip4str.model.clip4str._merge_rows` in NumPy)."""
    if len(rows) == len(logits):
        return part_logits, part_lengths
    width = max(logits.shape[1], part_logits.shape[1])
    out = np.pad(logits, ((0, 0), (0, width - logits.shape[1]), (0, 0)))
    out[rows, :part_logits.shape[1]] = part_logits
    lengths = lengths.copy()
    lengths[rows] = part_lengths
    return out, lengths
