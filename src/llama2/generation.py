"""`Llama`: a loaded model that generates, with Meta's public API plus streaming.

The API mirrors Meta's `llama/generation.py` (`Llama.build`, `generate`,
`text_completion`, `chat_completion` and their return shapes) and adds what users of
this field expect: streaming text, top-k, repetition penalty, stop strings, per-call
seeds and stopping at any of the model's end-of-turn tokens. Loading is `llama2.loader`'s,
the forwards `llama2.backends.ModelSteps`', streaming the request lifecycle of
`llama2.decode` (the server's engine runs the same).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypedDict

import torch
import torch.nn.functional as F

from .backends import ModelSteps, compile_model
from .chat import UNSAFE_REQUEST_ERROR, ChatFormat, Dialog, Llama2ChatFormat, Message, contains_special_tags
from .decode import (
    DecodingSequence,
    GenerationRequest,
    GenerationStats,
    check_max_tokens,
    check_prompts,
    run_in_slots,
    stream_alone,
)
from .errors import Llama2Error
from .loader import LoadedModel, load_model
from .model import Transformer
from .sampling import SamplingParams
from .text_stream import TextStreamer, truncate_at_stop
from .tokenizer import Tokenizer
from .weights.registry import DEFAULT_MODEL

__all__ = [
    "ChatPrediction",
    "CompletionPrediction",
    "GenerationStats",
    "Llama",
    "TextStreamer",
    "compile_model",
    "truncate_at_stop",
]

DEFAULT_MAX_SEQ_LEN = 4096


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # only when logprobs=True
    logprobs: list[float]  # only when logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: list[str]  # only when logprobs=True
    logprobs: list[float]  # only when logprobs=True


class Llama:
    """A loaded model with its tokenizer and chat format, ready to generate.

    Args:
        model: the model (its KV caches are installed here; nothing else of it changes).
        max_seq_len: longest prompt + answer; max_batch_size: most prompts generated together.
        seed: seed of the running sampling generator.
        compile, native: as `ModelSteps`'.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        chat_format: ChatFormat | None,
        max_seq_len: int,
        max_batch_size: int,
        *,
        seed: int = 1,
        compile: bool = False,
        native: bool = True,
    ):
        if max_seq_len > model.args.max_seq_len:
            raise Llama2Error(f"max_seq_len {max_seq_len} exceeds the model's context of {model.args.max_seq_len}")
        if max_seq_len < 2:
            raise Llama2Error(f"max_seq_len must be at least 2, got {max_seq_len}")
        self.model, self.tokenizer, self.chat_format = model, tokenizer, chat_format
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.device = model.norm.weight.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.last_stats = GenerationStats()
        self.steps = ModelSteps(model, max_seq_len, max_batch_size, compile=compile, native=native)

    @staticmethod
    def build(
        source: str | Path = DEFAULT_MODEL,
        tokenizer_path: str | Path | None = None,
        max_seq_len: int | None = None,
        max_batch_size: int = 1,
        seed: int = 1,
        *,
        compile: bool = False,
        native: bool = True,
        **load_options,
    ) -> Llama:
        """Load a model and its tokenizer (Meta's `Llama.build`).

        Args:
            source, tokenizer_path: as `llama2.loader.load_model`'s.
            max_seq_len: longest prompt + generation (default: the model's context, at most 4096).
            max_batch_size, seed, compile, native: as the constructor's.
            load_options: `load_model`'s device, dtype, chat_format and quant.
        """
        loaded = load_model(source, tokenizer_path, **load_options)
        return Llama.from_loaded(loaded, max_seq_len, max_batch_size, seed=seed, compile=compile, native=native)

    @staticmethod
    def from_loaded(loaded: LoadedModel, max_seq_len: int | None = None, max_batch_size: int = 1, **options) -> Llama:
        """A `Llama` over what `load_model` returned; `max_seq_len` defaults to the model's context, at most 4096."""
        max_seq_len = max_seq_len or min(loaded.args.max_seq_len, DEFAULT_MAX_SEQ_LEN)
        return Llama(loaded.model, loaded.tokenizer, loaded.chat_format, max_seq_len, max_batch_size, **options)

    def _sampling_context(self, seed: int | None) -> torch.Generator:
        return self.generator if seed is None else torch.Generator(device=self.device).manual_seed(seed)

    @torch.inference_mode()
    def perplexity(self, tokens: Sequence[int], window: int = 512) -> float:
        """exp(mean next-token loss) over `tokens`, scored in independent windows of `window` tokens
        (at most max_seq_len), each fed from position 0; every token but a window's first is scored."""
        window = min(window, self.max_seq_len)
        if window < 2 or len(tokens) < 2:
            raise Llama2Error("perplexity needs at least 2 tokens and a window of at least 2")
        vocab = self.model.args.vocab_size
        if any(not 0 <= t < vocab for t in tokens):
            raise Llama2Error(f"token ids must be in [0, {vocab})")
        loss_sum, scored = 0.0, 0
        for start in range(0, len(tokens) - 1, window):
            chunk = torch.tensor([tokens[start : start + window]], dtype=torch.long, device=self.device)  # [1, T>=2]
            logits = self.steps.step(chunk, 0, all_logits=True)  # [1, T, vocab]
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
        if len(prompt_tokens) > self.max_batch_size:
            raise Llama2Error(f"{len(prompt_tokens)} prompts exceed max_batch_size {self.max_batch_size}")
        check_prompts(prompt_tokens, self.model.args.vocab_size, self.max_seq_len)
        check_max_tokens(max_gen_len)
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        want = {"top_logprobs": 0 if logprobs else None, "prompt_logprobs": logprobs and echo}
        sequences = self._sequences(prompt_tokens, max_gen_len, sampling, stop_ids, stop, seed, **want)
        self.last_stats = GenerationStats()
        answer_logprobs = [[] for _ in sequences]
        for outputs in run_in_slots(self.steps, sequences, self.last_stats):
            for sequence, output in outputs:
                answer_logprobs[sequence.request.index].extend(entry.logprob for entry in output.logprobs)
        out_tokens = [s.tokens if echo else s.answer for s in sequences]
        if not logprobs:
            return out_tokens, None
        return out_tokens, [(s.prompt_logprobs if echo else []) + lp for s, lp in zip(sequences, answer_logprobs)]

    def _sequences(self, prompts, max_gen_len, sampling, stop_ids, stop, seed, **request) -> list[DecodingSequence]:
        """One `DecodingSequence` a prompt, all sampling from one generator (as Meta's batches);
        `request`: `GenerationRequest`'s log-probability options."""
        generator = self._sampling_context(seed)
        stop_ids = self.tokenizer.stop_ids if stop_ids is None else stop_ids
        return [
            DecodingSequence(
                GenerationRequest(prompt, max_gen_len, sampling, stop_ids=stop_ids, stop=stop, index=i, **request),
                self.tokenizer,
                generator,
                self.max_seq_len,
            )
            for i, prompt in enumerate(prompts)
        ]

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
        prompt_tokens = [self.tokenizer.encode(p, bos=self.tokenizer.add_bos, eos=False) for p in prompts]
        max_gen_len = max_gen_len or self.max_seq_len - 1
        generations, gen_logprobs = self.generate(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, **options
        )
        results = []
        for i, toks in enumerate(generations):
            text = truncate_at_stop(self.tokenizer.decode(toks), options.get("stop", ()))
            results.append(self._prediction({"generation": text}, toks, gen_logprobs and gen_logprobs[i]))
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
        prompt_tokens = [fmt.encode_dialog_prompt(dialog) for dialog in dialogs]
        options.setdefault("stop_ids", fmt.stop_ids)
        max_gen_len = max_gen_len or self.max_seq_len - 1
        generations, gen_logprobs = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, **options)
        results = []
        for i, toks in enumerate(generations):
            unsafe = isinstance(fmt, Llama2ChatFormat) and contains_special_tags(dialogs[i])
            content = truncate_at_stop(self.tokenizer.decode(toks), options.get("stop", ()))
            message = {"role": "assistant", "content": UNSAFE_REQUEST_ERROR if unsafe else content}
            results.append(self._prediction({"generation": message}, toks, gen_logprobs and gen_logprobs[i]))
        return results

    def _prediction(self, prediction: dict, tokens: list[int], logprobs: list[float] | None) -> dict:
        """`prediction` with each token's text and log-probability when they were asked for."""
        if logprobs is not None:
            prediction["tokens"] = [self.tokenizer.decode([t]) for t in tokens]
            prediction["logprobs"] = logprobs
        return prediction

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

        The request runs as one sequence in cache slot 0 through `llama2.decode` (the
        server's lifecycle). Pieces never split a multi-byte character, and text that
        might be the start of a stop string is held back until it is known not to be.
        """
        check_prompts([prompt_tokens], self.model.args.vocab_size, self.max_seq_len)
        max_gen_len = max_gen_len or self.max_seq_len - len(prompt_tokens)
        check_max_tokens(max_gen_len)
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty)
        (sequence,) = self._sequences([prompt_tokens], max_gen_len, sampling, stop_ids, stop, seed)
        self.last_stats = GenerationStats()
        return stream_alone(self.steps, sequence, self.last_stats)

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
