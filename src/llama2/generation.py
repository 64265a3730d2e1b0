"""`Llama`: load a checkpoint and generate, with Meta's public API plus streaming.

The API mirrors Meta's `llama/generation.py` (`Llama.build`, `generate`,
`text_completion`, `chat_completion` and their return shapes) and adds what users of
this field expect: streaming text, top-k, repetition penalty, stop strings, per-call
seeds and stopping at any of the model's end-of-turn tokens.
"""

from __future__ import annotations

import ctypes
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import torch
import torch.nn.functional as F

from .chat import (
    UNSAFE_REQUEST_ERROR,
    ChatFormat,
    Dialog,
    Llama2ChatFormat,
    Message,
    contains_special_tags,
    resolve_chat_format,
)
from .config import ModelArgs
from .errors import Llama2Error
from .fuse import fuse_projections
from .model import Transformer, meta_transformer
from .kernels import gguf_matmul_available
from .native import NativeForward, native_engine_supports
from .quant import PACKED_GGUF_TYPES, GGUFLinear, gguf_layer, install_quantized_head, quantize_model
from .sampling import SamplingParams, sample_next
from .tokenizer import Tokenizer
from .weights import Checkpoint, open_checkpoint
from .weights.inspect import checkpoint_tokenizer
from .weights.registry import DEFAULT_MODEL

DEFAULT_MAX_SEQ_LEN = 4096
PREFILL_CHUNK = 512  # prompt tokens per forward: bounds activation memory on long prompts


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # only when logprobs=True
    logprobs: list[float]  # only when logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: list[str]  # only when logprobs=True
    logprobs: list[float]  # only when logprobs=True


@dataclass
class GenerationStats:
    """Timings of the last generation call (for `llama2 generate --verbose` and benchmarks)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def default_dtype(args: ModelArgs, device: torch.device) -> torch.dtype:
    """float32 where it fits comfortably (exact, fast enough for small models), else bfloat16."""
    if device.type == "cuda":
        return torch.bfloat16
    fp32_bytes = 4 * args.num_params()
    return torch.float32 if fp32_bytes <= 4 * 1024**3 else torch.bfloat16


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


QUANT_MODES = ("auto", "none", "int8", "int4")
HEAD_WEIGHTS = ("tok_embeddings.weight", "output.weight")  # quantized too when the layers are packed
TRIM_EVERY_BYTES = 32 * 2**20  # packed GGUF bytes between heap trims (a trim walks the whole heap)


def packed_gguf_linears(checkpoint: Checkpoint, device: torch.device, quant: str) -> dict[str, str]:
    """Canonical names of the block linears whose GGUF blocks can be computed on packed (name -> type).

    Only with ``quant="auto"`` on the CPU, where PyTorch's int4 kernel runs.
    """
    if quant != "auto" or device.type != "cpu" or not hasattr(checkpoint.state_dict, "read_raw"):
        return {}
    return {
        name: kind
        for name, kind in checkpoint.tensor_types.items()
        if kind in PACKED_GGUF_TYPES and name.startswith("layers.") and name.endswith(".weight")
        and checkpoint.args.dim % 32 == 0 and checkpoint.args.hidden_dim % 32 == 0
    }


def build_model(
    checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, quant: str = "none", fuse: bool = False
) -> Transformer:
    """Build the Transformer without allocating, then take the checkpoint's tensors one by one.

    Args:
        checkpoint: a checkpoint, typically lazy (`open_checkpoint`) so that only the
            model's own memory is ever allocated.
        quant: "none" keeps every weight as `dtype`; "int8"/"int4" quantize the linear
            layers after loading (`llama2.quant.quantize_model`); "auto", on the CPU,
            computes GGUF Q4_0/Q4_1/Q8_0 layers and head from their blocks as stored
            where llama2's kernel runs (`llama2.kernels`), else repacked for PyTorch's
            int4 kernel (Q8_0 and the head as per-channel int8), and leaves other
            checkpoints as they are.
        fuse: join each block's q/k/v and gate/up projections (`fuse_projections`, for
            inference). Joining happens before any quantizing or repacking, on the
            file's block rows or the float rows, so no packed layout is ever taken apart.
    """
    if quant not in QUANT_MODES:
        raise Llama2Error(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_MODES)}")
    model = meta_transformer(checkpoint.args)
    packed = packed_gguf_linears(checkpoint, device, quant)
    keep_blocks = bool(packed) and gguf_matmul_available()
    state_dict, head_tables = {}, {}
    for name in checkpoint.state_dict:
        if name in packed:
            parent, attr = name.removesuffix(".weight").rsplit(".", 1)
            shape = tuple(model.get_submodule(f"{parent}.{attr}").weight.shape)
            raw = checkpoint.state_dict.read_raw(name)
            setattr(model.get_submodule(parent), attr, GGUFLinear(raw, packed[name], shape))  # as stored, for now
        elif packed and name in HEAD_WEIGHTS:
            shape = checkpoint.state_dict.spec(name).shape
            raw, type_name = checkpoint.state_dict.read_raw(name), checkpoint.tensor_types[name]
            head_tables[name] = gguf_layer(raw, type_name, shape, keep_blocks, int4=False)
        else:
            state_dict[name] = checkpoint.state_dict[name].to(device=device, dtype=dtype)
    if head_tables:
        install_quantized_head(model, head_tables, dtype)
    load_weights(model, state_dict, checkpoint.source)
    if fuse:
        fuse_projections(model)
    if packed and not keep_blocks:
        repack_gguf_blocks(model)
    if quant in ("int8", "int4") and not packed:
        quantize_model(model, quant)
    return model.eval()


def repack_gguf_blocks(model: Transformer) -> None:
    """Swap the blocks' `GGUFLinear` projections for layers PyTorch's kernels compute, one at a time, in place.

    Q4_0 / Q4_1 become `Int4Linear`, Q8_0 a per-channel `Int8Linear` (`llama2.quant.gguf_layer`).
    """
    unreleased = 0  # bytes repacked since the heap was last trimmed
    for module in model.layers.modules():
        for attr, child in list(module.named_children()):
            if isinstance(child, GGUFLinear):
                shape = (child.out_features, child.in_features)
                setattr(module, attr, gguf_layer(child.blocks, child.type_name, shape, keep_blocks=False))
                unreleased += child.blocks.numel()
                if unreleased >= TRIM_EVERY_BYTES:  # the packing's temporaries sit between kept tensors
                    release_freed_heap()
                    unreleased = 0


def release_freed_heap() -> None:
    """Give memory freed by the C heap back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    Packing a model tensor by tensor frees temporaries of a few MB between the tensors it
    keeps; glibc holds on to those holes, which cost a 7B model ~0.9 GB of resident memory.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        pass


def load_weights(model: Transformer, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Assign `state_dict` to a model built on the meta device; every tensor must end up real."""
    try:
        _, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[-1].strip()
        raise Llama2Error(f"{source}: weights do not match the model config ({first_line})") from None
    missing = [name for name, t in model.state_dict().items() if t.is_meta]  # modules swapped in came with their tensors
    if missing or unexpected:
        raise Llama2Error(f"{source}: weights do not match the model config "
                          f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")  # fmt: skip


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
        return torch.compile(model, dynamic=True, options=options)
    options = {"triton.cudagraphs": cuda_graphs, "coordinate_descent_tuning": matvec_as_reduction}
    return torch.compile(model, options=options)


# Inductor's CPU loops split across threads only from this many elements a thread (its
# default is 512): a decode step's many small element-wise kernels then skip the OpenMP
# fork/join (default model, compiled: 1.08x llama.cpp's decode against 1.04x before).
CPU_PARALLEL_MIN_CHUNK = 16384


class GuardFreeDecode:
    """A compiled CPU step that, once warm, skips Dynamo's guard checks on one-token, one-row calls.

    The checks cost ~0.8 ms of a ~6 ms decode step on a 30-layer model (a guard per weight
    tensor). Dynamo specializes sizes 0 and 1, so one-token calls of a single row (the
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


# A compiled CUDA decode step attends over the cache rounded up to a multiple of this many
# positions (masked), so a 4096-token context needs at most 16 recorded CUDA graphs.
CUDA_GRAPH_KV_BUCKET = 256


def _record_logprobs(token_logprobs, logits, tokens, start: int, end: int, pad: int) -> None:
    """Log-probabilities of tokens[:, start+1:end+1] under the logits of positions start..end-1."""
    token_logprobs[:, start + 1 : end + 1] = -F.cross_entropy(
        logits.transpose(1, 2), tokens[:, start + 1 : end + 1], reduction="none", ignore_index=pad
    )


class Llama:
    """A loaded model with its tokenizer and chat format, ready to generate."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        chat_format: ChatFormat | None,
        max_seq_len: int,
        max_batch_size: int,
        seed: int = 1,
        checkpoint: Checkpoint | None = None,
        compile: bool = False,
        native: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.checkpoint = checkpoint
        self.device = model.norm.weight.device
        self.seed = seed
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.last_stats = GenerationStats()
        model.setup_caches(max_batch_size, max_seq_len)
        # The native engine runs every cached forward of a model it supports (no compile needed).
        self.native = NativeForward(model) if native and native_engine_supports(model) else None
        self.decode_step = self.prefill_step = self.native or model
        self.kv_len_bucket = 1
        if compile and self.native is None:
            self._compile_steps()

    def _compile_steps(self) -> None:
        """Compiled steps: on CUDA, CUDA graphs per shape (prompts prefilled eagerly, the decode
        step's cache length rounded up to buckets); on the CPU, decode without guard checks."""
        compiled = compile_model(self.model)
        if self.device.type == "cuda":
            self.decode_step, self.kv_len_bucket = compiled, CUDA_GRAPH_KV_BUCKET
        else:
            self.prefill_step, self.decode_step = compiled, GuardFreeDecode(compiled)

    @staticmethod
    def build(
        source: str | Path = DEFAULT_MODEL,
        tokenizer_path: str | Path | None = None,
        max_seq_len: int | None = None,
        max_batch_size: int = 1,
        seed: int = 1,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        chat_format: str | None = None,
        compile: bool = False,
        quant: str = "auto",
        native: bool = True,
    ) -> "Llama":
        """Load a model and its tokenizer.

        Args:
            source: a registry name (e.g. ``"smollm2-135m-instruct"``), a GGUF file, a
                Hugging Face model folder or a Meta checkpoint folder.
            tokenizer_path: a tokenizer to use instead of the checkpoint's own.
            max_seq_len: longest prompt + generation (defaults to the model's context,
                capped at 4096).
            max_batch_size: most prompts generated together.
            seed: seed of the sampling generator.
            device: where to run (default: CUDA when available, else CPU).
            dtype: weight and activation dtype (default: bfloat16 for quantized layers,
                else float32 for small models on CPU and bfloat16 otherwise).
            chat_format: override of the chat format (``"llama-2"``, ``"chatml"``, a
                Jinja template); the checkpoint's own template is used otherwise.
            compile: compile the decode step with torch.compile (a slow first start,
                cached on disk for the next); skipped where the native engine runs
                the model (below).
            quant: "auto" (GGUF Q4_0/Q4_1 layers computed on their packed blocks on the
                CPU, with bfloat16 activations), "none" (dequantize everything to
                `dtype`), "int8" or "int4" (quantize the linear layers after loading).
            native: run prefill and decode of GGUF block models on the CPU through
                llama2's C++ engine (`llama2.native`), where it builds.
        """
        device = torch.device(device) if device is not None else default_device()
        checkpoint = open_checkpoint(source)
        quantized = quant in ("int8", "int4") or bool(packed_gguf_linears(checkpoint, device, quant))
        dtype = dtype or (torch.bfloat16 if quantized else default_dtype(checkpoint.args, device))
        tokenizer = checkpoint_tokenizer(checkpoint, tokenizer_path)
        if tokenizer.n_words > checkpoint.args.vocab_size:
            raise Llama2Error(
                f"{checkpoint.source}: tokenizer has {tokenizer.n_words} tokens but the model only "
                f"{checkpoint.args.vocab_size} embeddings"
            )
        checkpoint.tokenizer_metadata = None  # the tokenizer holds the vocabulary now
        release_freed_heap()  # the tokenizer's construction temporaries
        model = build_model(checkpoint, device, dtype, quant, fuse=True)
        release_freed_heap()  # the separate projections' memory
        checkpoint.state_dict = {}  # the model owns the tensors now
        max_seq_len = max_seq_len or min(checkpoint.args.max_seq_len, DEFAULT_MAX_SEQ_LEN)
        if max_seq_len > checkpoint.args.max_seq_len:
            raise Llama2Error(f"max_seq_len {max_seq_len} exceeds the model's context of {checkpoint.args.max_seq_len}")
        try:
            fmt = resolve_chat_format(tokenizer, tokenizer.chat_template, chat_format)
        except Llama2Error:
            if chat_format is not None:
                raise
            fmt = None  # a completion-only model: chat fails with a clear message later
        return Llama(model, tokenizer, fmt, max_seq_len, max_batch_size, seed, checkpoint, compile=compile, native=native)

    # ------------------------------------------------------------------ core loop

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int) -> None:
        if not prompt_tokens:
            raise Llama2Error("no prompts given")
        if len(prompt_tokens) > self.max_batch_size:
            raise Llama2Error(f"{len(prompt_tokens)} prompts exceed max_batch_size {self.max_batch_size}")
        if any(len(p) == 0 for p in prompt_tokens):
            raise Llama2Error("empty prompt: give at least one token")
        longest = max(len(p) for p in prompt_tokens)
        if longest >= self.max_seq_len:
            raise Llama2Error(
                f"prompt has {longest} tokens but the context holds {self.max_seq_len} "
                f"(prompt and answer together); shorten the prompt or raise max_seq_len"
            )
        if max_gen_len < 1:
            raise Llama2Error(f"max_gen_len must be at least 1, got {max_gen_len}")
        vocab = self.model.args.vocab_size
        if any(not 0 <= t < vocab for p in prompt_tokens for t in p):
            raise Llama2Error(f"prompt token ids must be in [0, {vocab})")

    def _steps(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int,
        sampling: SamplingParams,
        generator: torch.Generator,
        stop_ids: frozenset[int],
        want_logprobs: bool,
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Meta's generation loop as a generator.

        Prompts are right-padded; every step feeds the tokens from the previous position
        to the current one, and rows still inside their prompt take the prompt token
        instead of the sample. Yields (cur_pos, tokens [B, total_len], finished [B],
        token_logprobs [B, total_len] or None) after every step.
        """
        self._check_prompts(prompt_tokens, max_gen_len)
        batch = len(prompt_tokens)
        min_len = min(len(p) for p in prompt_tokens)
        max_len = max(len(p) for p in prompt_tokens)
        total_len = min(self.max_seq_len, max_gen_len + max_len)
        pad = -1
        tokens = torch.full((batch, total_len), pad, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompt_tokens):
            tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        in_prompt = tokens != pad
        token_logprobs = torch.zeros(tokens.shape, dtype=torch.float, device=self.device) if want_logprobs else None
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long, device=self.device)
        stats = self.last_stats = GenerationStats(prompt_tokens=max_len)

        prev_pos = 0
        if min_len == total_len and want_logprobs:
            logits = self.model(tokens, torch.arange(total_len, device=self.device))
            token_logprobs[:, 1:] = -F.cross_entropy(
                logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none", ignore_index=pad
            )
        start = time.perf_counter()
        while min_len - prev_pos > PREFILL_CHUNK:  # long prompts: prefill in chunks
            logits = self._forward(tokens, prev_pos, prev_pos + PREFILL_CHUNK, want_logprobs)
            if want_logprobs:
                _record_logprobs(token_logprobs, logits, tokens, prev_pos, prev_pos + PREFILL_CHUNK, pad)
            prev_pos += PREFILL_CHUNK
        for cur_pos in range(min_len, total_len):
            logits = self._forward(tokens, prev_pos, cur_pos, want_logprobs)
            next_token = sample_next(logits[:, -1], sampling, generator, tokens[:, :cur_pos])
            next_token = torch.where(in_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if want_logprobs:
                _record_logprobs(token_logprobs, logits, tokens, prev_pos, cur_pos, pad)
            finished |= ~in_prompt[:, cur_pos] & torch.isin(next_token, stop_tensor)
            if cur_pos == min_len:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()  # the prompt's time, not only the time to queue it
                stats.prefill_s = time.perf_counter() - start
                start = time.perf_counter()
            else:
                stats.decode_s = time.perf_counter() - start
            stats.generated_tokens = cur_pos + 1 - max_len
            prev_pos = cur_pos
            yield cur_pos, tokens, finished, token_logprobs
            if bool(finished.all()):
                break

    def _forward(self, tokens: torch.Tensor, start: int, end: int, all_logits: bool) -> torch.Tensor:
        """Feed tokens[:, start:end] at their positions; logits of every position or the last."""
        positions = torch.arange(start, end, device=self.device)
        if end - start > 1:
            return self.prefill_step(tokens[:, start:end], positions, kv_len=end, last_logits_only=not all_logits)
        kv_len = min(-(-end // self.kv_len_bucket) * self.kv_len_bucket, self.max_seq_len)  # end rounded up
        return self.decode_step(tokens[:, start:end], positions, kv_len=kv_len, last_logits_only=not all_logits)

    def _sampling_context(self, seed: int | None) -> torch.Generator:
        if seed is None:
            return self.generator
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.inference_mode()
    def perplexity(self, tokens: Sequence[int], window: int = 512) -> float:
        """exp(mean next-token loss) over `tokens`, scored in independent windows.

        The tokens are cut into windows of `window` (at most max_seq_len) tokens, each fed
        from position 0 with a fresh context; every token but a window's first is scored.
        """
        window = min(window, self.max_seq_len)
        if window < 2 or len(tokens) < 2:
            raise Llama2Error("perplexity needs at least 2 tokens and a window of at least 2")
        vocab = self.model.args.vocab_size
        if any(not 0 <= t < vocab for t in tokens):
            raise Llama2Error(f"token ids must be in [0, {vocab})")
        loss_sum, scored = 0.0, 0
        for start in range(0, len(tokens) - 1, window):
            chunk = torch.tensor([tokens[start : start + window]], dtype=torch.long, device=self.device)  # [1, T>=2]
            logits = self._forward(chunk, 0, chunk.shape[1], all_logits=True)  # [1, T, vocab]
            loss_sum += F.cross_entropy(logits[0, :-1].float(), chunk[0, 1:], reduction="sum").item()
            scored += chunk.shape[1] - 1
        return math.exp(loss_sum / scored)

    # ------------------------------------------------------------------ Meta's API

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = (),
        stop_ids: frozenset[int] | None = None,
        seed: int | None = None,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Generate continuations of tokenized prompts (Meta's `Llama.generate`).

        Args:
            prompt_tokens: one list of token ids per prompt.
            max_gen_len: most tokens to generate per prompt.
            temperature, top_p, top_k, repetition_penalty: sampling (temperature 0 is greedy).
            logprobs: also return each returned token's log-probability.
            echo: include the prompt tokens in the output.
            stop: strings that end a generation (the completion methods cut their text
                before the stop string; the tokens returned here still include it).
            stop_ids: token ids that end a generation (default: the tokenizer's
                end-of-sequence and end-of-turn tokens).
            seed: seed for this call only (default: the instance's running generator).

        Returns:
            (tokens, logprobs): per prompt, the output token ids (without the stop
            token), and their log-probabilities when requested (else None).
        """
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        stop_ids = self.tokenizer.stop_ids if stop_ids is None else stop_ids
        generator = self._sampling_context(seed)
        tokens = token_logprobs = None
        stopper = StopStringWatcher(self.tokenizer, stop, [len(p) for p in prompt_tokens])
        for cur_pos, tokens, finished, token_logprobs in self._steps(
            prompt_tokens, max_gen_len, sampling, generator, stop_ids, logprobs
        ):
            stopper.update(tokens, cur_pos, finished)
        out_tokens, out_logprobs = [], []
        for row, prompt in enumerate(prompt_tokens):
            first = 0 if echo else len(prompt)
            toks = tokens[row, first : len(prompt) + max_gen_len].tolist()
            toks = [t for t in toks if t >= 0]
            cut = _first_stop_index(toks, stop_ids, skip=len(prompt) - first)
            cut = min(cut, stopper.token_cut(row, first))
            out_tokens.append(toks[:cut])
            if logprobs:
                out_logprobs.append(token_logprobs[row, first : first + cut].tolist())
        return out_tokens, (out_logprobs if logprobs else None)

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        **options,
    ) -> list[CompletionPrediction]:
        """Complete each prompt (Meta's `Llama.text_completion`); `options` as in `generate`."""
        max_gen_len = max_gen_len or self.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(p, bos=self.tokenizer.add_bos, eos=False) for p in prompts]
        generations, generation_logprobs = self.generate(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, **options
        )
        stop = options.get("stop", ())
        results = []
        for i, toks in enumerate(generations):
            prediction: CompletionPrediction = {"generation": truncate_at_stop(self.tokenizer.decode(toks), stop)}
            if logprobs:
                prediction["tokens"] = [self.tokenizer.decode([t]) for t in toks]
                prediction["logprobs"] = generation_logprobs[i]
            results.append(prediction)
        return results

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        **options,
    ) -> list[ChatPrediction]:
        """Answer each dialog as the assistant (Meta's `Llama.chat_completion`).

        With the Llama-2-Chat format, a dialog containing the format's special tags
        (``[INST]``, ``<<SYS>>``, ...) gets Meta's refusal answer instead of a generation.
        """
        fmt = self._require_chat_format()
        max_gen_len = max_gen_len or self.max_seq_len - 1
        prompt_tokens = [fmt.encode_dialog_prompt(dialog) for dialog in dialogs]
        unsafe = [isinstance(fmt, Llama2ChatFormat) and contains_special_tags(d) for d in dialogs]
        options.setdefault("stop_ids", fmt.stop_ids)
        generations, generation_logprobs = self.generate(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, **options
        )
        stop = options.get("stop", ())
        results = []
        for i, toks in enumerate(generations):
            content = UNSAFE_REQUEST_ERROR if unsafe[i] else truncate_at_stop(self.tokenizer.decode(toks), stop)
            prediction: ChatPrediction = {"generation": {"role": "assistant", "content": content}}
            if logprobs:
                prediction["tokens"] = [self.tokenizer.decode([t]) for t in toks]
                prediction["logprobs"] = generation_logprobs[i]
            results.append(prediction)
        return results

    # ------------------------------------------------------------------ streaming

    @torch.inference_mode()
    def stream_tokens(
        self,
        prompt_tokens: list[int],
        max_gen_len: int | None = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        *,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] = (),
        stop_ids: frozenset[int] | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Generate from one tokenized prompt, yielding text pieces as they are decided.

        Pieces never split a multi-byte character, and text that might be the start of
        a stop string is held back until it is known not to be.
        """
        max_gen_len = max_gen_len or self.max_seq_len - len(prompt_tokens)
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        stop_ids = self.tokenizer.stop_ids if stop_ids is None else stop_ids
        streamer = TextStreamer(self.tokenizer, stop)
        steps = self._steps([prompt_tokens], max_gen_len, sampling, self._sampling_context(seed), stop_ids, False)
        for cur_pos, tokens, finished, _ in steps:
            token = int(tokens[0, cur_pos])
            if token in stop_ids:
                break
            piece = streamer.push(token)
            if piece:
                yield piece
            if streamer.stopped:
                steps.close()
                return
        tail = streamer.flush()
        if tail:
            yield tail

    def stream_text(self, prompt: str, **options) -> Iterator[str]:
        """Stream a completion of `prompt`; options as in `stream_tokens`."""
        return self.stream_tokens(self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos, eos=False), **options)

    def stream_chat(self, dialog: Dialog, **options) -> Iterator[str]:
        """Stream the assistant's answer to `dialog`; options as in `stream_tokens`."""
        fmt = self._require_chat_format()
        if isinstance(fmt, Llama2ChatFormat) and contains_special_tags(dialog):
            return iter([UNSAFE_REQUEST_ERROR])
        options.setdefault("stop_ids", fmt.stop_ids)
        return self.stream_tokens(fmt.encode_dialog_prompt(dialog), **options)

    def _require_chat_format(self) -> ChatFormat:
        if self.chat_format is None:
            raise Llama2Error("this model has no chat format; pass --chat-format (e.g. llama-2 or chatml)")
        return self.chat_format


def _first_stop_index(tokens: list[int], stop_ids: frozenset[int], skip: int) -> int:
    """Index of the first stop token at or after `skip` (len(tokens) when none)."""
    for i in range(max(skip, 0), len(tokens)):
        if tokens[i] in stop_ids:
            return i
    return len(tokens)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


class StopStringWatcher:
    """Ends rows of a batch whose generated text contains a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], prompt_lens: list[int]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_lens = prompt_lens
        self.cut_at: dict[int, int] = {}  # row -> absolute position after the token completing a stop string
        # Enough trailing tokens to contain any stop string plus a token of slack.
        self.window = max((len(s.encode()) for s in self.stop), default=0) + 2

    def update(self, tokens: torch.Tensor, cur_pos: int, finished: torch.Tensor) -> None:
        if not self.stop:
            return
        for row, prompt_len in enumerate(self.prompt_lens):
            if cur_pos < prompt_len or bool(finished[row]) or row in self.cut_at:
                continue
            tail = tokens[row, max(prompt_len, cur_pos + 1 - self.window) : cur_pos + 1].tolist()
            if any(s in self.tokenizer.decode(tail) for s in self.stop):
                self.cut_at[row] = cur_pos + 1
                finished[row] = True

    def token_cut(self, row: int, first: int) -> int:
        """Output-relative index after which row's tokens are dropped (text is cut exactly later)."""
        return self.cut_at[row] - first if row in self.cut_at else 1 << 62


class TextStreamer:
    """Turns generated token ids into text pieces, one call per token, with constant work a token.

    Each step decodes only the ids since the last decided piece, after the ids of that
    piece as context (so SentencePiece's leading-space rule and byte pieces decode as
    they do in the whole answer), emits only text that is complete (no trailing U+FFFD
    of a partial UTF-8 sequence), looks for stop strings only where a new one could
    start, and holds back anything that could begin a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.context = 0  # ids[context:decided] decoded into the last piece (the next piece's context)
        self.decided = 0  # ids[decided:] not yet turned into text
        self.text = ""  # all decided text so far
        self.emitted = 0  # characters of self.text already yielded
        self.search_from = 0  # no stop string starts before this character
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the newly decided text (possibly empty)."""
        self.ids.append(token)
        if self.stopped or not self._decide(final=False):
            return ""  # stopped, or waiting for the rest of a multi-byte character
        return self._release(final=False)

    def flush(self) -> str:
        """Everything still held back, at the end of generation."""
        if not self.stopped:
            self._decide(final=True)
        return self._release(final=True)

    def _decide(self, final: bool) -> bool:
        """Append the text of the undecided ids; False (nothing appended) while it ends mid-character."""
        if self.decided == len(self.ids):
            return True
        known = self.tokenizer.decode(self.ids[self.context : self.decided])
        extended = self.tokenizer.decode(self.ids[self.context :])
        if extended.endswith("\ufffd") and not final:
            return False
        self.search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=1) + 1)
        self.text += extended[len(known) :]
        self.context, self.decided = self.decided, len(self.ids)
        return True

    def _release(self, final: bool) -> str:
        end = len(self.text)
        for s in self.stop:
            hit = self.text.find(s, self.search_from)
            if hit >= 0:
                end = min(end, hit)
                self.stopped = True
        if self.stopped:
            self.text = self.text[:end]
        elif not final:
            end -= self._partial_stop_len()
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    def _partial_stop_len(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    longest = max(longest, n)
                    break
        return longest
