"""An lm-evaluation-harness (0.4.x) model backed by a `Llama`, counting as the harness's HFLM counts.

Texts are encoded as HFLM's `tok_encode` does with `add_bos_token` unset (lm-eval 0.4.13):
with the tokenizer's own special tokens, so BOS leads them when the model adds BOS.

- `loglikelihood`: each (context, continuation) is encoded as `LM._encode_pair` does
  (trailing spaces of the context move to the continuation; the continuation's tokens are
  those of context + continuation past the context's own tokens); an empty context is the
  prefix token (BOS, else EOS) before the continuation's tokens (without special tokens),
  or the continuation's first token when that is the prefix token. Each is scored with
  the window HFLM feeds (`loglikelihood_window`): (sum of log-probs, whether every
  continuation token was the greedy one).
- `loglikelihood_rolling`: HFLM's rolling windows (`rolling_windows`), summed.
- `generate_until`: greedy continuation of the context cut at the first of `until` (plus
  the EOS text), at most `max_gen_toks` (default 256) tokens.

Requests are scored independently, each window from position 0, so results do not
depend on batch size or order. `register()` registers the model as ``llama2`` with
lm_eval when it is installed (``pip install llama2[eval]``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import Llama2Error
from ..generation import truncate_at_stop
from .perplexity import harness_encode
from .scoring import loglikelihoods
from .windows import Window, loglikelihood_window, rolling_windows

DEFAULT_MAX_GEN_TOKS = 256


class Llama2LM:
    """The harness's LM interface (`loglikelihood`, `loglikelihood_rolling`, `generate_until`) over a `Llama`.

    Args:
        llama: a loaded `llama2.generation.Llama`.
        batch_size: equal-length windows forwarded together (at most llama.max_batch_size).
        max_length: the harness's max_length (default: llama.max_seq_len).
    """

    def __init__(self, llama, batch_size: int = 1, max_length: int | None = None):
        self.llama = llama
        self.tokenizer = llama.tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or llama.max_seq_len
        if self.max_length > llama.max_seq_len:
            raise Llama2Error(f"max_length {self.max_length} exceeds the loaded context of {llama.max_seq_len}")

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context stands for: BOS, else EOS (HFLM's prefix_token_id)."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id >= 0 else self.tokenizer.eos_id

    def tok_encode(self, text: str, special: bool = True) -> list[int]:
        """HFLM's `tok_encode`: BOS first when `special`, the model adds BOS and the text does not start with it."""
        return harness_encode(self.tokenizer, text, special)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """HFLM's `_encode_pair` (with its empty-context case from `loglikelihood`)."""
        if context == "":
            continuation_enc = self.tok_encode(continuation, special=False)
            if continuation_enc and continuation_enc[0] == self.prefix_token_id:
                return continuation_enc[:1], continuation_enc[1:]
            return [self.prefix_token_id], continuation_enc
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        context_enc = self.tok_encode(context)
        return context_enc, whole[len(context_enc) :]

    def _score(self, windows: Sequence[Window]) -> list[tuple[float, bool]]:
        return loglikelihoods(self.llama, windows, self.batch_size)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) per request with ``args == (context, continuation)``."""
        windows = []
        for request in requests:
            context, continuation = request.args[:2]
            context_enc, continuation_enc = self.encode_pair(context, continuation)
            if not continuation_enc:
                raise Llama2Error(f"empty continuation for context {context[-40:]!r}")
            windows.append(loglikelihood_window(context_enc, continuation_enc, self.max_length))
        return self._score(windows)

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of each whole text (``args == (text,)``) over HFLM's rolling windows."""
        totals = []
        for request in requests:
            tokens = self.tok_encode(request.args[0])
            windows = rolling_windows(tokens, self.prefix_token_id, self.max_length) if tokens else []
            totals.append(sum(logprob for logprob, _ in self._score(windows)))
        return totals

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations of ``args == (context, gen_kwargs)``, cut at gen_kwargs["until"]."""
        eos_text = self.tokenizer.eos_token  # HFLM adds tok_decode(eot, skip_special_tokens=False)
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args[:2]
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_gen = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            max_gen = min(max_gen, self.max_length - 1)
            prompt = (self.tok_encode(context) or [self.prefix_token_id])[
                -(self.max_length - max_gen) :
            ]  # HFLM's left cut
            tokens, _ = self.llama.generate([prompt], max_gen_len=max_gen, temperature=0.0, stop=until)
            outputs.append(truncate_at_stop(self.tokenizer.decode(tokens[0]), until))
        return outputs


def register():
    """The lm_eval model class ``llama2`` (our `Llama2LM` on lm_eval's `LM`), registered once; needs lm_eval."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import MODEL_REGISTRY, register_model
    except ImportError:
        raise Llama2Error("lm-evaluation-harness is not installed: pip install 'llama2[eval]'") from None
    if "llama2" in MODEL_REGISTRY:
        return MODEL_REGISTRY["llama2"]

    class HarnessLlama2(Llama2LM, LM):
        """``--model llama2 --model_args pretrained=M[,max_length=N,device=D]`` or a loaded `Llama`."""

        def __init__(self, llama=None, pretrained: str | None = None, batch_size=1, max_length=None, device=None, **_):
            LM.__init__(self)
            batch_size = int(batch_size) if str(batch_size).isdigit() else 1  # "auto" -> 1
            max_length = int(max_length) if max_length else None
            if llama is None:
                from ..generation import Llama

                llama = Llama.build(pretrained, max_seq_len=max_length, max_batch_size=batch_size, device=device)
            Llama2LM.__init__(self, llama, min(batch_size, llama.max_batch_size), max_length)

    return register_model("llama2")(HarnessLlama2)
