"""Single-sequence CPU forward through llama2's native engine, for models made of GGUF blocks.

When every projection of a `Transformer` is a `GGUFLinear` (a GGUF file's Q4_0 / Q4_1 /
Q8_0 blocks, see `llama2.quant`) and the kernels build, `NativeForward` runs a batch-1
forward (prefill chunks and decode steps) as one call into the C++ engine
`llama2_kernels.GGUFLlama` (`kernels/llama_engine.cpp`): float32 activations, the
model's own KV cache buffers, the file's blocks without copies. The embedding lookup and
the output head stay the model's modules. Batches of several rows go to the fallback
(the model, or its compiled step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .kernels import gguf_matmul_available
from .model import Transformer, rotary_cos_sin
from .quant import DENSE_MAX_WEIGHT_VALUES, DENSE_MIN_ROWS, GGUFLinear, QuantizedEmbedding

# The engine's projection slots, in order: the inputs of attention, its output, the
# inputs of the feed-forward (gate, then up), its output.
SLOT_QKV, SLOT_OUT, SLOT_GATE_UP, SLOT_DOWN = range(4)


def _projections(block) -> list[list[torch.nn.Module]]:
    """A block's projections per engine slot (fused where `fuse_projections` fused them)."""
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
    """A `Transformer`'s forward for one sequence, run by the native engine.

    Called like the model in `Llama`'s loop: ``(tokens [1, T], input_pos [T], *, kv_len,
    last_logits_only) -> float logits [1, T or 1, vocab]``, with `input_pos` consecutive
    positions. Other calls (several rows, per-row positions) go to `fallback`.
    """

    def __init__(self, model: Transformer, fallback: Callable[..., torch.Tensor] | None = None):
        """
        Args:
            model: a model `native_engine_supports`, with its caches set up (the engine
                writes the same buffers, so the model and the engine can take turns).
            fallback: what runs the calls the engine does not take (default: the model).
        """
        if not native_engine_supports(model):
            raise ValueError("the native engine needs a CPU model of GGUF block layers with KV caches set up")
        self.model = model
        self.fallback = fallback or model
        self.head_dtype = None if isinstance(model.output, GGUFLinear) else model.norm.weight.dtype
        self.engine = self._build_engine(model)

    @staticmethod
    def _build_engine(model: Transformer):
        args = model.args
        cos, sin = rotary_cos_sin(torch.arange(model.cache_len), args.head_dim, args.rope_theta)  # [S, head_dim / 2]
        engine = torch.classes.llama2_kernels.GGUFLlama(
            args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim, args.norm_eps, cos, sin,
            model.norm.weight.detach(), DENSE_MIN_ROWS, DENSE_MAX_WEIGHT_VALUES,
        )  # fmt: skip
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

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, *, kv_len=None, last_logits_only: bool = False,
                 **options) -> torch.Tensor:  # fmt: skip
        if tokens.shape[0] != 1 or input_pos.dim() != 1 or options or not isinstance(kv_len, (int, type(None))):
            return self.fallback(tokens, input_pos, kv_len=kv_len, last_logits_only=last_logits_only, **options)
        normed = self.engine.forward(self.embed(tokens[0]), int(input_pos[0]), last_logits_only)  # [T or 1, dim]
        if self.head_dtype is not None:
            normed = normed.to(self.head_dtype)
        return self.model.project_output(normed).float().unsqueeze(0)
