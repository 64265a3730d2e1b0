"""How a model with KV caches computes: the native CPU engine, compiled steps, or its modules.

`ModelSteps` installs a model's caches, picks the execution backend by asking the model
(`native_engine_supports`: every projection GGUF blocks on the CPU, kernels built) or, on
request, compiles it, and is the one way generation (`Llama`) and the server's engine
call a forward: prompt chunks (`prefill`), one-token rows (`decode`) and rows that share
positions (`step`: scoring, perplexity).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from .model import Transformer
from .native import NativeForward, native_engine_supports
from .quant import decode_rows_per_pass

# A compiled CUDA decode step attends over the cache rounded up to a multiple of this many
# positions (masked), so a 4096-token context needs at most 16 recorded CUDA graphs.
CUDA_GRAPH_KV_BUCKET = 256


class ModelSteps:
    """A model's caches and the forwards that run it.

    Args:
        model: the loaded model (its KV caches are installed here, `max_batch_size` slots
            of `max_seq_len` positions).
        compile: compile the forward (`compile_model`) where the native engine does not run it.
        native: run models of GGUF blocks through llama2's C++ engine on the CPU, where it builds.

    Attributes:
        native: the `NativeForward`, when the native engine runs the model.
        rows_per_pass: most one-token rows one `decode` call computes each as if alone.
    """

    def __init__(self, model: Transformer, max_seq_len: int, max_batch_size: int, *, compile=False, native=True):
        self.model = model
        self.max_seq_len = max_seq_len
        self.device = model.norm.weight.device
        model.setup_caches(max_batch_size, max_seq_len)
        self.native = NativeForward(model) if native and native_engine_supports(model) else None
        self.rows = self.native or model  # per-row positions, cache slots and cache lengths
        self.prefill_step = self.decode_step = self.rows
        self.kv_len_bucket = 1
        self.rows_per_pass = decode_rows_per_pass(model)
        if compile and self.native is None:
            self._compile()

    def _compile(self) -> None:
        """On CUDA, CUDA graphs per shape (prompts prefilled eagerly, the decode step's cache
        length rounded up to buckets); on the CPU, both compiled, decode without guard checks."""
        compiled = compile_model(self.model)
        if self.device.type == "cuda":
            self.decode_step, self.kv_len_bucket = compiled, CUDA_GRAPH_KV_BUCKET
        else:
            self.prefill_step, self.decode_step = compiled, GuardFreeDecode(compiled)

    def step(self, tokens: torch.Tensor, start: int, all_logits: bool = False) -> torch.Tensor:
        """Feed `tokens` ([B, T], rows in cache slots 0..B-1) at positions start..start+T-1.

        Returns:
            float logits [B, T, vocab] with `all_logits`, else [B, 1, vocab] of the last position.
        """
        end = start + tokens.shape[1]
        positions = torch.arange(start, end, device=self.device)
        if tokens.shape[1] > 1:
            return self.prefill_step(tokens, positions, kv_len=end, last_logits_only=not all_logits)
        kv_len = min(-(-end // self.kv_len_bucket) * self.kv_len_bucket, self.max_seq_len)  # end rounded up
        return self.decode_step(tokens, positions, kv_len=kv_len, last_logits_only=not all_logits)

    def prefill(self, tokens: Sequence[int], start: int, slot: int, all_logits: bool = False) -> torch.Tensor:
        """Feed one sequence's prompt tokens at positions start.. into cache slot `slot`.

        Returns:
            float logits [T, vocab] with `all_logits`, else [vocab] of the last position.
        """
        chunk = torch.tensor([tokens], dtype=torch.long, device=self.device)  # [1, T]
        if slot == 0:
            logits = self.step(chunk, start, all_logits)[0]  # [T or 1, vocab]
        else:
            end = start + len(tokens)
            positions = torch.arange(start, end, device=self.device)
            slots = torch.tensor([slot], device=self.device)
            logits = self.rows(chunk, positions, cache_slots=slots, kv_len=end, last_logits_only=not all_logits)[0]
        return logits if all_logits else logits[-1]

    def decode(self, tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        """One token per row (at most `rows_per_pass` rows), each at its own position and cache slot.

        Every row attends over its own cache length only, so its logits do not depend on the
        other rows. Returns float logits [B, vocab].
        """
        # [B, 1] as a view of [B, 2]: on torch 2.13 the CPU-compiled step crashed (heap corruption) on a
        # contiguous [1, 1] input after graphs for strided ones (`Llama.stream_tokens` with compile=True)
        ids = torch.tensor([[t, 0] for t in tokens], dtype=torch.long, device=self.device)[:, :1]
        if list(slots) == [0]:  # a single sequence: the plain step (compiled or CUDA graphs where enabled)
            return self.step(ids, positions[0])[:, -1]
        where = torch.tensor([[p] for p in positions], device=self.device)  # [B, 1]
        cache_slots = torch.tensor(list(slots), device=self.device)  # [B]
        kv_lens = [p + 1 for p in positions]  # per-row attention: each row as if decoded alone
        return self.rows(ids, where, cache_slots=cache_slots, kv_len=kv_lens)[:, -1]


def inductor_cpu_simdlen() -> int | None:
    """The vector width (bits) Inductor's CPU code must use under `ATEN_CPU_CAPABILITY`, or
    None to let it choose. With the capability capped below the CPU's (`avx2` on an AVX-512
    machine), PyTorch 2.13's Inductor emits AVX2 code whose bfloat16 loops are tiled for
    512-bit vectors unless `cpp.simdlen` names the width: wrong results (half the values
    left unwritten), e.g. a compiled SiLU after an extern kernel."""
    return {"avx2": 256, "avx512": 512}.get(os.environ.get("ATEN_CPU_CAPABILITY", "").lower())


def compile_model(
    model: Transformer, matvec_as_reduction: bool = True, cuda_graphs: bool = True
) -> Callable[..., torch.Tensor]:
    """The model's forward compiled for prefill chunks and decode steps.

    On the CPU, sequence and cache lengths are dynamic sizes (a graph for decode and one
    for prefill, whatever the position); the graphs are frozen with their weights and
    called through a C++ wrapper. On CUDA the step replays CUDA graphs (one per cache
    length, see `CUDA_GRAPH_KV_BUCKET`), and a one-row matrix product becomes a Triton
    reduction that dequantizes int8 weights as it reads them. Inductor caches compiled
    code on disk, so a second start skips most of the cold compile.

    Args:
        matvec_as_reduction: on CUDA, let one-row matrix products become tuned Triton
            reductions (Inductor's coordinate-descent tuning) rather than cuBLAS calls.
        cuda_graphs: on CUDA, replay the step as CUDA graphs (off: for kernel profiles).
    """
    if model.norm.weight.device.type == "cpu":
        options = {"cpp_wrapper": True, "freezing": True, "cpp.min_chunk_size": CPU_PARALLEL_MIN_CHUNK}
        simdlen = inductor_cpu_simdlen()
        if simdlen:
            options["cpp.simdlen"] = simdlen
        return torch.compile(model, dynamic=True, options=options)
    options = {"triton.cudagraphs": cuda_graphs, "coordinate_descent_tuning": matvec_as_reduction}
    return torch.compile(model, options=options)


# Inductor's CPU loops split across threads only from this many elements a thread (its
# default is 512): a decode step's many small element-wise kernels then skip the OpenMP
# fork/join (measured in docs/performance.md).
CPU_PARALLEL_MIN_CHUNK = 16384


class GuardFreeDecode:
    """A compiled CPU step that, once warm, skips Dynamo's guard checks on one-token, one-row calls.

    The checks cost a guard per weight tensor on every call (measured in docs/performance.md).
    Dynamo specializes sizes 0 and 1, so one-token calls of a single row (the
    decode steps of `generate`) have a graph of their own in which only the cache length
    is symbolic, bounded by the cache; once that graph has run twice the checks are skipped
    for such calls (`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`, which still
    tells cached graphs apart and refuses, before running anything, inputs none of them
    fits: then the call is made again with the checks). Every other call is checked.
    """

    WARM_CALLS = 2

    def __init__(self, step: Callable[..., torch.Tensor]):
        self.step = step
        self.warm_calls: dict[bool, int] = {}  # one-row one-token calls so far, by last_logits_only

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, *, kv_len: int, last_logits_only: bool):
        kind = last_logits_only
        if tokens.shape != (1, 1) or self.warm_calls.get(kind, 0) < self.WARM_CALLS:
            if tokens.shape == (1, 1):
                self.warm_calls[kind] = self.warm_calls.get(kind, 0) + 1
            return self.step(tokens, input_pos, kv_len=kv_len, last_logits_only=last_logits_only)
        try:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self.step(tokens, input_pos, kv_len=kv_len, last_logits_only=last_logits_only)
        except RuntimeError as err:  # raised before running when no compiled graph fits the inputs
            if "skip_guard_eval_unsafe" not in str(err):
                raise
            self.warm_calls[kind] = 0
            return self.step(tokens, input_pos, kv_len=kv_len, last_logits_only=last_logits_only)
