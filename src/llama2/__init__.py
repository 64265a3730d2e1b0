"""llama2: Meta's Llama 2 on PyTorch.

Public API::

    from llama2 import Llama, ModelArgs, Transformer, Tokenizer
    llama = Llama.build("smollm2-135m-instruct")
    llama.chat_completion([[{"role": "user", "content": "hi"}]])
"""

from . import rss as _rss  # noqa: F401  (imported first: memory right after PyTorch's import, `llama2 bench`'s baseline)
from .chat import ChatFormat, Dialog, JinjaChatFormat, Llama2ChatFormat, Message, resolve_chat_format
from .config import PRESETS, ModelArgs, model_args_from_preset
from .errors import Llama2Error
from .generation import ChatPrediction, CompletionPrediction, Llama
from .model import Transformer
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .weights import Checkpoint, load_checkpoint

__all__ = [
    "PRESETS",
    "ChatFormat",
    "ChatPrediction",
    "Checkpoint",
    "CompletionPrediction",
    "Dialog",
    "JinjaChatFormat",
    "Llama",
    "Llama2ChatFormat",
    "Llama2Error",
    "Message",
    "ModelArgs",
    "SamplingParams",
    "Tokenizer",
    "Transformer",
    "load_checkpoint",
    "model_args_from_preset",
    "resolve_chat_format",
]
