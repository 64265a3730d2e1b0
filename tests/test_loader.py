"""`llama2.loader`: one way from a checkpoint to a model, a tokenizer and a chat format.

References are transformers' `LlamaForCausalLM` (logits) and sentencepiece (tokens).
"""

import shutil

import pytest
import sentencepiece as spm
import torch

from llama2.chat import Llama2ChatFormat
from llama2.errors import Llama2Error
from llama2.generation import Llama
from llama2.loader import load_model
from llama2.tokenizer import llama2_tokenizer_path
from llama2.train.config import TrainConfig
from llama2.train.model_setup import load_training_model

from helpers import LLAMA2_MODEL, assert_matches_reference, make_hf_llama, random_tokens


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random tiny HF Llama with Meta's tokenizer beside it; returns (folder, transformers' model)."""
    folder = tmp_path_factory.mktemp("tiny")
    hf_model = make_hf_llama(folder, gqa=True, vocab_size=32000)
    shutil.copy(llama2_tokenizer_path(), folder / "tokenizer.model")
    return folder, hf_model


def test_load_model_gives_transformers_logits_sentencepiece_tokens_and_the_chat_format(tiny_folder):
    folder, hf_model = tiny_folder
    loaded = load_model(folder, device="cpu", quant="none", fuse=False)
    assert_matches_reference(loaded.model, hf_model, random_tokens(32000))
    text = "Loading in one place: naïve café"
    assert loaded.tokenizer.encode(text, bos=False, eos=False) == spm.SentencePieceProcessor(
        model_file=str(LLAMA2_MODEL)
    ).encode(text)
    assert isinstance(loaded.chat_format, Llama2ChatFormat)


def test_llama_takes_what_was_loaded_without_changing_it(tiny_folder):
    folder, _ = tiny_folder
    loaded = load_model(folder, device="cpu")
    weights = {name: t.clone() for name, t in loaded.model.state_dict().items()}
    first = Llama.from_loaded(loaded, max_seq_len=32)
    second = Llama.from_loaded(loaded, max_seq_len=32)  # the same load serves twice
    assert first.model is second.model is loaded.model and first.tokenizer is loaded.tokenizer
    prompt = loaded.tokenizer.encode("Hello", bos=True, eos=False)
    assert first.generate([prompt], 4, temperature=0)[0] == second.generate([prompt], 4, temperature=0)[0]
    state = loaded.model.state_dict()
    assert all(torch.equal(state[name], weights[name]) for name in weights)


def test_trainer_loads_a_checkpoint_through_the_loader(tiny_folder):
    folder, hf_model = tiny_folder
    loaded = load_training_model(TrainConfig(model=str(folder)))
    assert loaded.model.training and loaded.model.tok_embeddings.weight.dtype == torch.float32
    assert loaded.model.layers[0].attention.wqkv is None  # unfused, as training needs
    loaded.model.eval()
    assert_matches_reference(loaded.model, hf_model, random_tokens(32000))


def test_a_context_beyond_the_models_is_a_clear_error(tiny_folder):
    folder, _ = tiny_folder
    with pytest.raises(Llama2Error, match="context of 64"):
        Llama.build(folder, max_seq_len=65, device="cpu")
