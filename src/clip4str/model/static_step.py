"""A static greedy decoding step: caches of the full length, the position as a tensor, no host sync inside.

Every shape is fixed for a whole decoding loop, so one step function serves all positions, both branches and
`torch.compile(fullgraph=True)` (one graph, no recompilation per position). Layer 0's inputs depend only on
(token, position), so their projections are looked up in tables computed once per weights (`step_tables`):
at batch 1 a step is bound by reading weights, and the tables remove three of its nine matrix products.
"""

from __future__ import annotations

import types
import warnings
import weakref
from dataclasses import dataclass

import torch

from clip4str.errors import first_line
from clip4str.model.decoder import KV, Decoder, additive_mask


@dataclass
class StepTables:
    """Layer 0's self-attention keys and values of every (token, content position), and its position queries."""

    key: tuple
    keys: torch.Tensor     # (tokens, T, D)
    values: torch.Tensor   # (tokens, T, D)
    queries: torch.Tensor  # (T, D): the query stream's projected queries


def _weights_key(decoder: Decoder, length: int, device: torch.device) -> tuple:
    layer = decoder.layers[0]
    params = (decoder.text_embed.embedding.weight, decoder.pos_queries, layer.norm_c.weight, layer.norm_c.bias,
              layer.norm_q.weight, layer.norm_q.bias, layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias)
    # The version counter changes with every in-place update (optimizer steps, load_state_dict); writes through
    # `.data` bypass it, so the decoder also drops its tables on load_state_dict and train().
    versions = tuple((p.data_ptr(), p.dtype, p._version if not p.is_inference() else -1) for p in params)
    autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
    return (length, str(device), autocast, versions)


@torch.no_grad()
def step_tables(decoder: Decoder, length: int) -> StepTables:
    """The tables for `length` positions, computed again only when the weights or the autocast state changed."""
    device = decoder.pos_queries.device
    key = _weights_key(decoder, length, device)
    cached = decoder.__dict__.get("_step_tables")
    if cached is not None and cached.key == key:
        return cached
    layer = decoder.layers[0]
    tokens = torch.arange(decoder.text_embed.embedding.num_embeddings, device=device)
    positions = torch.arange(length, device=device)
    content = decoder.content(tokens[:, None], positions[None])
    k, v = (x.transpose(1, 2).flatten(2) for x in layer.self_attn.project_kv(layer.norm_c(content)))
    # clone: a view of a parameter as a module input trips module hooks under inference_mode (FlopCounterMode)
    q = layer.self_attn.query_heads(layer.norm_q(decoder.pos_queries[:, :length].clone()))
    tables = StepTables(key, k, v, q.transpose(1, 2).flatten(2)[0])
    decoder.__dict__["_step_tables"] = tables  # not a buffer: never saved, moved or copied with the weights
    return tables


def empty_caches(decoder: Decoder, batch: int, length: int, like: torch.Tensor) -> list[KV]:
    """Zeroed self-attention key/value caches (B, H, length, D/H) for every layer, dtype and device of `like`."""
    heads = decoder.layers[0].self_attn.heads
    dim = decoder.pos_queries.shape[-1]
    shape = (batch, heads, length, dim // heads)
    return [(like.new_zeros(shape), like.new_zeros(shape)) for _ in decoder.layers]


def decoding_step(decoder: Decoder, tokens: torch.Tensor, position: torch.Tensor, memory: list[KV],
                  caches: list[KV], tables: StepTables) -> tuple[torch.Tensor, list[KV]]:
    """Logits (B, C) at `position` (a 0-d long tensor) given the token (B,) at content position `position`
    (BOS at 0), and the caches with that token's keys and values written in (new tensors, inputs unchanged).

    Computes what `Decoder.forward` computes for that query under the causal mask (inference: no dropout).
    """
    batch, length = tokens.shape[0], caches[0][0].shape[2]
    hidden = torch.arange(length, device=tokens.device) > position
    mask = additive_mask(hidden[None], None)
    at = position.view(1)
    query = decoder.pos_queries[0, position].view(1, 1, -1).expand(batch, 1, -1)
    content = decoder.content(tokens[:, None], position) if len(decoder.layers) > 1 else None
    last = len(decoder.layers) - 1
    new_caches = []
    for i, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        if i == 0:
            k, v = (attn._heads(t[tokens, position].unsqueeze(1)) for t in (tables.keys, tables.values))
            q = attn._heads(tables.queries[position].view(1, 1, -1)).expand(batch, -1, -1, -1)
        else:
            content_norm = layer.norm_c(content)
            k, v = attn.project_kv(content_norm)
            q = attn.query_heads(layer.norm_q(query))
        k_cache, v_cache = caches[i][0].index_copy(2, at, k.to(caches[i][0].dtype)), \
            caches[i][1].index_copy(2, at, v.to(caches[i][1].dtype))
        new_caches.append((k_cache, v_cache))
        if i < last:
            if i == 0:  # layer 0's keys and values came from the tables
                content_norm = layer.norm_c(content)
            content = layer.finish(content + attn(content_norm, (k_cache, v_cache), mask), memory[i])
        query = layer.finish(query + attn.attend(q, k_cache, v_cache, mask), memory[i])
    return decoder.head(decoder.norm(query))[:, 0], new_caches


def cloze_pass(decoder: Decoder, context: torch.Tensor, hidden: torch.Tensor, memory: list[KV],
               tables: StepTables, first: int | torch.Tensor = 0) -> torch.Tensor:
    """Refinement logits (B, Lq, C) of a one-layer decoder: position queries [first, first + Lq) (or those at
    the positions of `first`, an (Lq,) tensor) over the whole `context` (B, L) tokens, `hidden` (B, Lq, L) True
    where a query may not look; `Decoder.forward`'s result with layer 0's projections looked up in `tables`
    (inference: no dropout). Queries are independent of each other, so a pass may be split into sets of
    queries, and passes over one context joined."""
    if len(decoder.layers) != 1:
        raise ValueError("cloze_pass is for one-layer decoders; use Decoder.forward")
    layer, (batch, length), queries = decoder.layers[0], context.shape, hidden.shape[1]
    attn = layer.self_attn
    positions = torch.arange(length, device=context.device)
    k, v = (attn._heads(t[context, positions]) for t in (tables.keys, tables.values))
    at = first if isinstance(first, torch.Tensor) else slice(first, first + queries)
    q = attn._heads(tables.queries[None, at]).expand(batch, -1, -1, -1)
    mask = torch.zeros(hidden.shape, device=hidden.device).masked_fill(hidden, float("-inf"))[:, None]
    query = decoder.pos_queries[:, at].expand(batch, -1, -1)
    query = layer.finish(query + attn.attend(q, k, v, mask), memory[0])
    return decoder.head(decoder.norm(query))


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
BACKEND = "inductor"  # torch.compile's backend (tests substitute one that fails)


class _CompiledStep:
    """`decoding_step` through torch.compile, falling back to eager (with one warning) if compiling fails, as it
    does where no C++ compiler is installed: a long job then goes on instead of stopping at its first read."""

    def __init__(self) -> None:
        # Why a copy of the function per decoder: torch.compile keeps its graphs per code object with a limit of
        # 8, which one process with several models, branches and batch sizes would exceed. The batch size
        # becomes dynamic at its first change, so a decoder needs one graph per dtype and at most two shapes.
        fn = types.FunctionType(decoding_step.__code__.replace(), decoding_step.__globals__, decoding_step.__name__)
        self.step = torch.compile(fn, fullgraph=True, backend=BACKEND)

    def __call__(self, *args: object) -> tuple[torch.Tensor, list[KV]]:
        try:
            return self.step(*args)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            first = first_line(e)
            warnings.warn(f"torch.compile could not compile the decoding step ({first[:200]}); decoding eagerly "
                          "(same results; install a C++ compiler such as g++ for compiled steps)", stacklevel=2)
            self.step = decoding_step
            return decoding_step(*args)


def compiled_decoding_step(decoder: Decoder) -> _CompiledStep:
    """`decoding_step` compiled for `decoder` (compiled at its first call, then reused)."""
    step = _COMPILED.get(decoder)
    if step is None:
        step = _COMPILED[decoder] = _CompiledStep()
    return step
