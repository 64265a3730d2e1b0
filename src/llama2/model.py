"""The Llama 2 transformer as pure `torch.nn` modules.

No file I/O and no device placement live here: the same modules serve prefill, cached
decode and training. Cached attention on the CPU has two inference-only paths of its own
(`small_query_attention` for decode-sized queries, row-invariant so a server's batch
rows equal single runs; `matmul_attention` for bfloat16 prefill chunks and compiled
graphs); everything else, including the KV cache, is shared with training. Weight names are Meta's
(`tok_embeddings`, `layers.N.attention.wq`, ...), the one canonical naming every format
reader maps to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import ModelArgs


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the rotary angles for `positions`, in float32.

    Args:
        positions: integer positions, shape [T] (shared by the batch) or [B, T].
        head_dim: size of one attention head (even).
        theta: RoPE base frequency.

    Returns:
        (cos, sin), each of shape positions.shape + [head_dim // 2].
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.float().unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of adjacent channels (Meta's interleaved RoPE layout).

    Args:
        x: [B, T, n_heads, head_dim].
        cos, sin: [T, head_dim // 2] or [B, T, head_dim // 2].
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, H, head_dim/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [(B,) T, 1, head_dim/2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)  # [B, T, H, head_dim]


class KVCache(nn.Module):
    """Static key/value buffers for one attention layer, written at given positions."""

    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int, slots: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v at their positions and return the first `kv_len` cached positions.

        Args:
            input_pos: [T] positions shared by the batch, or [B, T] per row.
            k, v: [B, n_kv_heads, T, head_dim].
            kv_len: how many leading cache positions the attention reads.
            slots: [B] cache rows of the batch rows (None: rows 0..B-1).

        Returns:
            keys and values, [B, n_kv_heads, kv_len, head_dim].
        """
        if slots is None and input_pos.dim() == 1:
            batch = k.shape[0]
            self.k[:batch].index_copy_(2, input_pos, k.to(self.k.dtype))
            self.v[:batch].index_copy_(2, input_pos, v.to(self.v.dtype))
            return self.k[:batch, :, :kv_len], self.v[:batch, :, :kv_len]
        if slots is None:
            slots = torch.arange(k.shape[0], device=k.device)
        positions = input_pos.expand(k.shape[0], -1) if input_pos.dim() == 1 else input_pos  # [B, T]
        rows = slots[:, None]  # [B, 1], broadcast against positions
        self.k[rows, :, positions] = k.transpose(1, 2).to(self.k.dtype)  # indexed view is [B, T, n_kv, head_dim]
        self.v[rows, :, positions] = v.transpose(1, 2).to(self.v.dtype)
        # index_select after slicing copies kv_len positions per row (advanced indexing would gather the whole row).
        return self.k[:, :, :kv_len].index_select(0, slots), self.v[:, :, :kv_len].index_select(0, slots)


class CacheWrite(NamedTuple):
    """Where a cached forward stores keys/values, and how its rows attend.

    Attributes:
        input_pos: [T] or [B, T] positions of the tokens.
        slots: [B] KV-cache rows of the batch rows (None: rows 0..B-1).
        row_kv_lens: per-row cache lengths; when given, a row's result is bitwise what a
            batch of one computes: attention runs row by row over each row's own length
            (padded keys would change SDPA's summation order), except for small queries on
            the CPU, whose kernel is exact under padding (`small_query_attention`).
    """

    input_pos: torch.Tensor
    slots: torch.Tensor | None
    row_kv_lens: tuple[int, ...] | None = None


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads and an optional static KV cache."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.wqkv: nn.Module | None = None  # wq, wk, wv as one matmul (inference: `fuse_projections`)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache_write: CacheWrite | None = None,
    ) -> torch.Tensor:
        """Attention over `x` ([B, T, dim]).

        Args:
            cos, sin: rotary tables for the T positions.
            mask: boolean [(B, 1,) T, S] (True = may attend), or None for plain causal.
            cache_write: where to store this step's keys/values in the KV cache (then
                attend over its first S positions); None without a cache.
        """
        batch, seq_len, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.view(batch, seq_len, self.n_heads, self.head_dim)
        k = k.view(batch, seq_len, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq_len, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, head_dim]

        if cache_write is not None:
            k, v = self.kv_cache.update(cache_write.input_pos, k, v, mask.shape[-1], cache_write.slots)
        if cache_write is not None and cache_write.row_kv_lens is not None and not is_small_query(q):
            out = self._attend_rows(q, k, v, mask, cache_write.row_kv_lens)
        else:
            out = self._attend(q, k, v, mask, cached=cache_write is not None)
        out = out.transpose(1, 2).reshape(batch, seq_len, -1)  # [B, T, n_heads * head_dim]
        return self.wo(out)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x, [B, T, heads * head_dim] each."""
        if self.wqkv is None:
            return self.wq(x), self.wk(x), self.wv(x)
        kv_width = self.n_kv_heads * self.head_dim
        return self.wqkv(x).split((self.n_heads * self.head_dim, kv_width, kv_width), dim=-1)

    def _attend_rows(self, q, k, v, mask, lengths: Sequence[int]) -> torch.Tensor:
        """Attention one row at a time, row i over its first lengths[i] cached positions.

        A one-token query sees all of its row's positions, so it goes without a mask:
        bitwise the result of an all-true mask, minus the mask's conversion per call.
        """
        rows = []
        for i, n in enumerate(lengths):
            row_mask = None if q.shape[2] == 1 else mask[i : i + 1, ..., :n]
            rows.append(self._attend(q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], row_mask, cached=True))
        return torch.cat(rows)

    def _attend(self, q, k, v, mask: torch.Tensor | None, cached: bool) -> torch.Tensor:
        """Softmax attention; `mask` None means causal without a cache, all visible with one."""
        k, v = k.to(q.dtype), v.to(q.dtype)
        if cached and is_small_query(q):
            return small_query_attention(q, k, v, mask)
        scores = q.shape[1] * q.shape[2] * k.shape[2]
        if cached and q.device.type == "cpu" and q.dtype == torch.bfloat16 and scores <= CHUNK_SCORES_MAX:
            return matmul_attention(q, k, v, mask, torch.bfloat16)  # prefill chunks: faster (docs/performance.md)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and not cached, enable_gqa=self.n_kv_heads != self.n_heads
        )


# Decode-sized queries on the CPU: small matmuls beat the flash kernel, which tiles for long queries
# (docs/performance.md).
SMALL_QUERY_MAX = 16
# Keys are processed in blocks of this many positions, each block one fixed-shape matmul.
KEY_BLOCK = 64
# Largest heads x queries x keys score tensor a CPU prefill chunk computes with two matmuls (64 MB fp32).
CHUNK_SCORES_MAX = 2**24


def is_small_query(q: torch.Tensor) -> bool:
    """Whether cached attention for `q` ([B, H, T, head_dim]) goes through `small_query_attention`."""
    return q.device.type == "cpu" and q.shape[2] <= SMALL_QUERY_MAX


def small_query_attention(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention for a few query positions over cached keys, scores and softmax in fp32.

    Row-invariant: a row's result does not depend on how many keys the batch pads it to,
    so rows of different lengths are computed together and each comes out bitwise as if
    it ran alone over its own keys (tests/test_model.py checks it). Two things make it so:
    the matmuls run on fixed-shape blocks of KEY_BLOCK keys (a BLAS call's rounding may
    change with its sizes), and masked keys get exactly zero weight, which the
    reductions add lane by lane without changing a sum.

    Args:
        q: [B, H, T, head_dim]; k, v: [B, KV, S, head_dim] with H a multiple of KV
            (query heads h*R .. h*R+R-1 share key/value head h).
        mask: boolean [T, S] or [B, 1, T, S] (True = may attend), or None (all visible).

    Returns:
        [B, H, T, head_dim] in q's dtype.
    """
    if torch.compiler.is_compiling():  # block counts would specialize the graph on kv_len % KEY_BLOCK
        return matmul_attention(q, k, v, mask)
    batch, n_heads, seq_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    pad = -kv_len % KEY_BLOCK
    if mask is None:
        mask = torch.ones(seq_len, kv_len, dtype=torch.bool, device=q.device)
    k, v, mask = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)), F.pad(mask, (0, pad), value=False)
    blocks = (kv_len + pad) // KEY_BLOCK
    k = k.float().view(batch, n_kv_heads, blocks, KEY_BLOCK, head_dim)
    v = v.view(batch, n_kv_heads, blocks, KEY_BLOCK, head_dim)
    grouped = q.reshape(batch, n_kv_heads, 1, group * seq_len, head_dim).float()  # [B, KV, 1, R*T, hd]
    scores = grouped @ k.transpose(-1, -2) * head_dim**-0.5  # [B, KV, blocks, R*T, KEY_BLOCK]
    scores = scores.view(batch, n_kv_heads, blocks, group, seq_len, KEY_BLOCK)
    visible = mask.unflatten(-1, (blocks, KEY_BLOCK)).transpose(-3, -2).unsqueeze(-3)  # [(B, 1,) blocks, 1, T, KB]
    scores = scores.masked_fill(~visible, float("-inf"))
    scores = scores.permute(0, 1, 3, 4, 2, 5).reshape(batch, n_kv_heads, group, seq_len, blocks * KEY_BLOCK)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)  # [B, KV, R, T, S']
    probs = probs.view(batch, n_kv_heads, group * seq_len, blocks, KEY_BLOCK).transpose(
        2, 3
    )  # [B, KV, blocks, R*T, KB]
    out = (probs @ v).sum(dim=2)  # per-block [R*T, KB] @ [KB, hd], then over blocks: [B, KV, R*T, hd]
    return out.view(batch, n_heads, seq_len, head_dim)  # [B, KV, R*T, hd] -> [B, H, T, hd]


def matmul_attention(q, k, v, mask: torch.Tensor | None, scores_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Attention as two batched matmuls around an fp32 softmax (the shapes as `small_query_attention`).

    Serves compiled decode graphs (where key blocks would specialize the graph; not
    row-invariant) and, with bfloat16 `scores_dtype`, bfloat16 prefill chunks on the CPU.
    """
    batch, n_heads, seq_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    grouped = q.reshape(batch, n_kv_heads, group * seq_len, head_dim).to(scores_dtype)  # [B, KV, R*T, hd]
    scores = (grouped @ k.to(scores_dtype).transpose(-1, -2)).float() * head_dim**-0.5  # [B, KV, R*T, S]
    if mask is not None:
        visible = mask.unsqueeze(-3)  # [(B, 1,) 1, T, S] against scores [B, KV, R, T, S]
        scores = scores.view(batch, n_kv_heads, group, seq_len, kv_len).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores.view(batch, n_kv_heads, group * seq_len, kv_len), dim=-1).to(v.dtype)
    return (probs @ v).view(batch, n_heads, seq_len, head_dim)  # [B, KV, R*T, hd] -> [B, H, T, hd]


class FeedForward(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w13: nn.Module | None = None  # w1 and w3 as one matmul (inference: `fuse_projections`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            gate, up = self.w1(x), self.w3(x)
        else:
            gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm attention and feed-forward with residual connections."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, cache_write=None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache_write)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """A Llama 2 decoder.

    Without caches, `forward(tokens)` is plain causal attention over the sequence (training,
    scoring). After `setup_caches`, `forward(tokens, input_pos)` writes keys and values at
    `input_pos` and attends to every cached position up to each token's own: one call
    path for prefill (many positions) and decode (one position).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.max_batch_size = 0
        self.cache_len = 0

    def project_output(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states: the output head, or the embedding matrix when tied."""
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype=None, device=None) -> None:
        """Install static KV caches for up to `max_batch_size` sequences of `max_seq_len` tokens."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context {self.args.max_seq_len}")
        reference = self.norm.weight  # stays floating point whatever quantization swaps in
        dtype = dtype or reference.dtype
        device = device or reference.device
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache(max_batch_size, max_seq_len, attn.n_kv_heads, attn.head_dim, dtype, device)
        self.max_batch_size, self.cache_len = max_batch_size, max_seq_len

    def clear_caches(self) -> None:
        """Remove the KV caches (back to training-style full-sequence attention)."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.max_batch_size = self.cache_len = 0

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        *,
        cache_slots: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_len: int | Sequence[int] | None = None,
        last_logits_only: bool = False,
    ) -> torch.Tensor:
        """Logits for `tokens`.

        Args:
            tokens: token ids, [B, T].
            input_pos: positions of the tokens, [T] (shared by the batch) or [B, T] (per
                row). Required once caches are installed; without caches it defaults to
                0..T-1 (per-row positions serve packed training sequences).
            cache_slots: [B] KV-cache rows the batch rows use (default 0..B-1), so a
                server can run any subset of its sequences.
            document_ids: [B, T] ids of the packed example each token belongs to
                (training without caches): attention stays within an example.
            kv_len: how many leading cache positions to attend over (at least the
                largest position + 1); computed from `input_pos` when None. Passing it
                from the host saves a device sync and lets a compiled step treat it as
                a dynamic size. A sequence gives each row's own length (batch-invariant
                decode for servers: see `CacheWrite.row_kv_lens`).
            last_logits_only: compute logits for the last position only (saves the
                [B, T, vocab] projection during prefill).

        Returns:
            float logits, [B, T, vocab] (or [B, 1, vocab]).
        """
        seq_len = tokens.shape[1]
        cached = self.cache_len > 0
        if cached and input_pos is None:
            raise ValueError("input_pos is required once KV caches are set up")
        if input_pos is None:
            input_pos = torch.arange(seq_len, device=tokens.device)
        row_kv_lens = None
        if kv_len is not None and not isinstance(kv_len, int):
            row_kv_lens = tuple(kv_len)
            kv_len = max(row_kv_lens)
        if cached:
            mask = cache_mask(input_pos, kv_len)
            cache_write = CacheWrite(input_pos, cache_slots, row_kv_lens)
        else:
            mask = None if document_ids is None else document_mask(document_ids)
            cache_write = None
        cos, sin = rotary_cos_sin(input_pos, self.args.head_dim, self.args.rope_theta)

        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache_write)
        if last_logits_only:
            h = h[:, -1:]
        return self.project_output(self.norm(h)).float()


class _SkipMetaInit(TorchFunctionMode):
    """Makes in-place random initializers no-ops on meta tensors, which hold no values.

    Some (`normal_`) have no native meta kernel: PyTorch would import its Python
    reference implementations (sympy and ~800 modules, ~75 MB) just to initialize nothing.
    """

    INITIALIZERS = frozenset(
        {
            torch.Tensor.normal_,
            torch.Tensor.uniform_,
            torch.Tensor.fill_,
            torch.Tensor.zero_,
            nn.init.normal_,
            nn.init.uniform_,
            nn.init.trunc_normal_,
            nn.init.kaiming_uniform_,
            nn.init.kaiming_normal_,
            nn.init.xavier_uniform_,
            nn.init.xavier_normal_,
            nn.init.zeros_,
            nn.init.ones_,
            nn.init.constant_,
        }
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.INITIALIZERS:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))  # nn.init passes tensor=...
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def meta_transformer(args: ModelArgs, customize: Callable[[Transformer], None] | None = None) -> Transformer:
    """A `Transformer` on the meta device (shapes, no storage), to be filled with `load_state_dict(assign=True)`.

    Args:
        customize: called on the model inside the meta context (e.g. to add adapters).
    """
    with torch.device("meta"), _SkipMetaInit():
        model = Transformer(args)
        if customize is not None:
            customize(model)
    return model


def cache_mask(input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
    """Boolean mask letting each query see cached keys at positions <= its own.

    The key axis covers the cache slots in use (up to the largest position + 1), so
    decode attends over the filled part of the cache only.

    Args:
        input_pos: [T] or [B, T] positions.
        kv_len: key positions covered (default: the largest position + 1).

    Returns:
        [T, S] for shared positions, [B, 1, T, S] for per-row positions.
    """
    if kv_len is None:
        kv_len = int(input_pos.max()) + 1
    key_pos = torch.arange(kv_len, device=input_pos.device)
    mask = key_pos <= input_pos.unsqueeze(-1)  # [(B,) T, S]
    return mask if input_pos.dim() == 1 else mask.unsqueeze(1)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Causal mask that keeps attention inside each packed example: [B, T] -> [B, 1, T, T]."""
    seq_len = document_ids.shape[1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)  # [B, T, T]
    return (same_document & causal).unsqueeze(1)
