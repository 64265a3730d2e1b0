"""Cached CPU forward through llama2's native engine, for models made of GGUF blocks.

When every projection of a `Transformer` is a `GGUFLinear` (a GGUF file's Q4_0 / Q4_1 /
Q8_0 blocks, see `llama2.quant`) and the kernels build, `NativeForward` runs each
sequence's cached forward (a prefill chunk or a decode step) as one call into the C++
engine `llama2_kernels.GGUFLlama` (`kernels/llama_engine.cpp`, the kernel variant in use): float32 activations, the
model's own KV cache buffers, the file's blocks without copies. The embedding lookup and
the output head stay the model's modules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .kernels import gguf_matmul_available, namespace_for, requested_isa, variant_ops
from .model import Transformer, rotary_cos_sin
from .quant import (
    DENSE_MAX_WEIGHT_VALUES,
    DENSE_MIN_ROWS,
    GGUFLinear,
    QuantizedEmbedding,
)

# Rows per engine call: longer prefill chunks are split (their activations and attention
# scores are the peak of a small model's memory; 256 rows keep the prompt speed of 512).
ENGINE_CHUNK = 256


def _projections(block) -> list[list[torch.nn.Module]]:
    """A block's projections per engine slot: attention's inputs (q, k, v), its output, the
    feed-forward's inputs (gate, then up), its output; fused where `fuse_projections` fused them."""
    attention, feed_forward = block.attention, block.feed_forward
    qkv = [attention.wqkv] if attention.wqkv is not None else [attention.wq, attention.wk, attention.wv]
    gate_up = [feed_forward.w13] if feed_forward.w13 is not None else [feed_forward.w1, feed_forward.w3]
    return [qkv, [attention.wo], gate_up, [feed_forward.w2]]


def native_engine_supports(model: Transformer) -> bool:
    """Whether `NativeForward` can run `model`: CPU, KV caches installed, every projection GGUF blocks."""
    if model.norm.weight.device.type != "cpu" or model.cache_len == 0:
        return False
    layers = [linear for block in model.layers for slot in _projections(block) for linear in slot]
    return all(isinstance(linear, GGUFLinear) for linear in layers) and gguf_matmul_available()


class NativeForward:
    """A `Transformer`'s cached forward, run by the native engine.

    Called like the model: ``(tokens [B, T], input_pos [T] or [B, T], *, cache_slots,
    kv_len, last_logits_only) -> float logits [B, T or 1, vocab]``, each row's positions
    consecutive. Prompts run one sequence at a time; one-token steps of several sequences
    run in one pass whose rows are computed as if alone (over their own cache slot and
    length, with batch-invariant matmuls), so a row's logits do not depend on the batch:
    generation, batched prompts and the server give the same tokens. Calls with other
    options go to `fallback`.
    """

    def __init__(self, model: Transformer, fallback: Callable[..., torch.Tensor] | None = None, isa: str | None = None):
        """
        Args:
            model: a model `native_engine_supports`, with its caches set up (the engine
                writes the same buffers, so the model and the engine can take turns; after
                `setup_caches` installs new ones, the next call rebuilds the engine over them).
            fallback: what runs the calls the engine does not take (default: the model).
            isa: the kernel variant whose engine runs (default: the one in use,
                `llama2.kernels.selected_isa()`; tests compare variants).
        """
        if not native_engine_supports(model):
            raise ValueError("the native engine needs a CPU model of GGUF block layers with KV caches set up")
        self.isa = isa or requested_isa()
        variant_ops(self.isa)  # built and loaded
        self.model = model
        self.fallback = fallback or model
        self.head_dtype = None if isinstance(model.output, GGUFLinear) else model.norm.weight.dtype
        self.engine = self._build_engine(model)
        self._caches = model.layers[0].attention.kv_cache  # the buffers the engine was given

    def _build_engine(self, model: Transformer):
        args = model.args
        cos, sin = rotary_cos_sin(torch.arange(model.cache_len), args.head_dim, args.rope_theta)  # [S, head_dim / 2]
        engine = getattr(torch.classes, namespace_for(self.isa)).GGUFLlama(
            args.n_heads,
            args.n_kv_heads,
            args.head_dim,
            args.hidden_dim,
            args.norm_eps,
            cos,
            sin,
            model.norm.weight.detach(),
            DENSE_MIN_ROWS,
            DENSE_MAX_WEIGHT_VALUES,
        )
        for block in model.layers:
            cache = block.attention.kv_cache
            engine.add_layer(block.attention_norm.weight.detach(), block.ffn_norm.weight.detach(), cache.k, cache.v)
            for slot, linears in enumerate(_projections(block)):
                for linear in linears:
                    engine.add_linear(slot, linear.blocks, linear.qtype, linear.out_features, linear.in_features)
        return engine

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """float32 embeddings [T, dim] of token ids [T] (quantized tables decoded without rounding)."""
        table = self.model.tok_embeddings
        if isinstance(table, QuantizedEmbedding):
            return table.float_rows(tokens)
        return table(tokens).float()

    def __call__(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor,
        *,
        cache_slots: torch.Tensor | None = None,
        kv_len=None,
        last_logits_only: bool = False,
        **options,
    ) -> torch.Tensor:
        """Logits for `tokens`; `kv_len` is implied by the positions (each row attends to its own)."""
        caches = self.model.layers[0].attention.kv_cache
        if caches is not self._caches and caches is not None:  # `setup_caches` installed new buffers
            self.engine, self._caches = self._build_engine(self.model), caches
        if options or caches is None:
            return self.fallback(
                tokens, input_pos, cache_slots=cache_slots, kv_len=kv_len, last_logits_only=last_logits_only, **options
            )
        batch = tokens.shape[0]
        slots = list(range(batch)) if cache_slots is None else cache_slots.tolist()
        if batch > 1 and tokens.shape[1] == 1:  # decode steps of several sequences: one pass
            positions = input_pos.reshape(-1).tolist() if input_pos.dim() == 2 else [int(input_pos[0])] * batch
            normed = self.engine.forward_rows(self.embed(tokens[:, 0]), positions, slots)  # [B, dim]
            if self.head_dtype is None:  # a GGUF head's kernel computes rows independently of their number
                return self._logits(normed).unsqueeze(1)  # [B, 1, vocab]
            return torch.stack([self._logits(normed[i : i + 1]) for i in range(batch)])  # a GEMM may round by M
        rows = []
        for row in range(batch):
            start = int(input_pos[0] if input_pos.dim() == 1 else input_pos[row, 0])
            hidden = self.embed(tokens[row])  # [T, dim]
            parts = [
                self.engine.forward(hidden[i : i + ENGINE_CHUNK], start + i, last_logits_only, slots[row])
                for i in range(0, hidden.shape[0], ENGINE_CHUNK)
            ]
            rows.append(self._logits(parts[-1] if last_logits_only else torch.cat(parts)))  # [T or 1, vocab]
        return torch.stack(rows)  # [B, T or 1, vocab]

    def _logits(self, normed: torch.Tensor) -> torch.Tensor:
        """float logits [N, vocab] of final hidden states [N, dim] through the model's head."""
        if self.head_dtype is not None:
            normed = normed.to(self.head_dtype)
        return self.model.project_output(normed).float()
