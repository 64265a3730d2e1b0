"""Tokenizers with Meta's Llama 2 API over two backends.

`SentencePieceTokenizer` runs Google's `sentencepiece` (Llama 2's own tokenizer, and
any SentencePiece vocabulary a GGUF file carries, rebuilt as a real SentencePiece model).
`HFTokenizer` runs Hugging Face's `tokenizers` (a `tokenizer.json`, or a byte-level BPE
vocabulary a GGUF file carries). Both answer the same `Tokenizer` interface:

    tok = Tokenizer.from_file("tokenizer.model")      # or a .gguf, tokenizer.json, folder
    ids = tok.encode("Hello", bos=True, eos=False)
    text = tok.decode(ids)

Plain `encode` never reads special tokens written in the text (`"<s>"` is three plain
pieces, as in Meta's code); `encode_with_special` does, for rendered chat templates.

Modules: `base` (the interface, file discovery), `sentencepiece_backend`, `hf_backend`,
`gguf_vocab` (vocabularies in GGUF metadata, both ways) and `pretokenizers` (llama.cpp's
splitting before byte-level BPE). `tokenizer_config.json` is read by
`llama2.weights.tokenizer_files`, beside the other checkpoint files.
"""

from ..weights.tokenizer_files import read_tokenizer_config
from .base import END_OF_TURN_PIECES, Tokenizer
from .hf_backend import HFTokenizer
from .sentencepiece_backend import SentencePieceTokenizer, llama2_tokenizer_path

__all__ = [
    "END_OF_TURN_PIECES",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "llama2_tokenizer_path",
    "read_tokenizer_config",
]
