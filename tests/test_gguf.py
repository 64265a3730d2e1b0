"""The GGUF reader against files written by gguf-py's own `GGUFWriter`.

Expected tensors are decoded independently with `gguf.quants.dequantize`; the canonical
names below are spelled out here rather than taken from the reader.
"""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf import quants as gguf_quants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama2.errors import Llama2Error
from llama2.weights.checkpoint import Checkpoint
from llama2.weights.gguf import read_gguf, read_gguf_metadata

DIM, N_LAYERS, N_HEADS, N_KV_HEADS, HIDDEN, VOCAB, CONTEXT = 64, 2, 4, 2, 128, 100, 256
HEAD_DIM = DIM // N_HEADS
TOKENS = [f"tok{i}" for i in range(VOCAB)]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

# GGUF name -> (Meta name, torch shape, GGML type written).
GLOBAL_TENSORS = {
    "token_embd.weight": ("tok_embeddings.weight", (VOCAB, DIM), T.Q8_0),
    "output_norm.weight": ("norm.weight", (DIM,), T.F32),
    "output.weight": ("output.weight", (VOCAB, DIM), T.Q4_1),
}
LAYER_TENSORS = {
    "attn_q.weight": ("attention.wq.weight", (N_HEADS * HEAD_DIM, DIM), T.Q4_0),
    "attn_k.weight": ("attention.wk.weight", (N_KV_HEADS * HEAD_DIM, DIM), T.Q4_1),
    "attn_v.weight": ("attention.wv.weight", (N_KV_HEADS * HEAD_DIM, DIM), T.F16),
    "attn_output.weight": ("attention.wo.weight", (DIM, N_HEADS * HEAD_DIM), T.BF16),
    "ffn_gate.weight": ("feed_forward.w1.weight", (HIDDEN, DIM), T.Q8_0),
    "ffn_down.weight": ("feed_forward.w2.weight", (DIM, HIDDEN), T.F16),
    "ffn_up.weight": ("feed_forward.w3.weight", (HIDDEN, DIM), T.Q5_1),
    "attn_norm.weight": ("attention_norm.weight", (DIM,), T.F32),
    "ffn_norm.weight": ("ffn_norm.weight", (DIM,), T.F32),
}


def tensor_table(n_layers: int = N_LAYERS, tied: bool = False) -> dict[str, tuple[str, tuple[int, ...], T]]:
    table = {k: v for k, v in GLOBAL_TENSORS.items() if not (tied and k == "output.weight")}
    for i in range(n_layers):
        for name, (meta, shape, qtype) in LAYER_TENSORS.items():
            # Layer 1 stores its attention in F32 to cover plain tensors in layers too.
            qtype = T.F32 if i == 1 and name.startswith("attn_q") else qtype
            table[f"blk.{i}.{name}"] = (f"layers.{i}.{meta}", shape, qtype)
    return table


def base_metadata(arch: str = "llama") -> dict[str, tuple]:
    """Key -> (value, GGUF value type); the architecture key is written by GGUFWriter."""
    return {
        f"{arch}.block_count": (N_LAYERS, V.UINT32),
        f"{arch}.context_length": (CONTEXT, V.UINT32),
        f"{arch}.embedding_length": (DIM, V.UINT32),
        f"{arch}.feed_forward_length": (HIDDEN, V.UINT32),
        f"{arch}.attention.head_count": (N_HEADS, V.UINT32),
        f"{arch}.attention.head_count_kv": (N_KV_HEADS, V.UINT32),
        f"{arch}.rope.freq_base": (50000.0, V.FLOAT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
        f"{arch}.rope.dimension_count": (HEAD_DIM, V.UINT32),
        f"{arch}.vocab_size": (VOCAB, V.UINT32),
        "general.name": ("tiny test llama", V.STRING),
        "tokenizer.ggml.model": ("llama", V.STRING),
        "tokenizer.ggml.tokens": (TOKENS, V.ARRAY),
        "tokenizer.ggml.scores": ([float(-i) for i in range(VOCAB)], V.ARRAY),
        "tokenizer.ggml.token_type": ([1] * VOCAB, V.ARRAY),
        "tokenizer.ggml.bos_token_id": (1, V.UINT32),
        "tokenizer.chat_template": (CHAT_TEMPLATE, V.STRING),
    }


def encode(values: np.ndarray, qtype: T) -> np.ndarray:
    if qtype == T.F32:
        return values
    if qtype == T.F16:
        return values.astype(np.float16)
    return gguf_quants.quantize(values, qtype)


def decode(data: np.ndarray, qtype: T) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf_quants.dequantize(data, qtype), dtype=np.float32))


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    n_layers: int = N_LAYERS,
    tied: bool = False,
    metadata: dict[str, tuple | None] | None = None,
    tensors: dict[str, tuple[tuple[int, ...], T] | None] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write a tiny llama GGUF; return the expected decoded tensors by Meta name.

    `metadata` and `tensors` override or (with None) drop entries of the defaults.
    """
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    kv = {**base_metadata(arch), **(metadata or {})}
    for key, entry in kv.items():
        if entry is not None:
            writer.add_key_value(key, entry[0], entry[1])
    table = {name: (shape, qtype) for name, (_, shape, qtype) in tensor_table(n_layers, tied).items()}
    table.update(tensors or {})
    expected = {}
    for name, entry in table.items():
        if entry is None:
            continue
        shape, qtype = entry
        data = encode(rng.standard_normal(shape, dtype=np.float32), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        expected[name] = decode(data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta_names = {name: meta for name, (meta, _, _) in tensor_table(n_layers, tied).items()}
    return {meta_names.get(name, name): value for name, value in expected.items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    untied, tied = root / "untied.gguf", root / "tied.gguf"
    files = {
        "untied": (untied, write_gguf(untied)),
        "tied": (tied, write_gguf(tied, tied=True, seed=1)),
        "dir": root,
    }
    files["header_end"] = gguf.GGUFReader(untied).data_offset
    return files


@pytest.fixture(scope="module")
def untied(files):
    path, expected = files["untied"]
    return path, expected, read_gguf(path)


def raises_for(path: Path, match: str = "", **kwargs) -> Llama2Error:
    """Read `path`, expecting a one-line `Llama2Error` naming the file."""
    with pytest.raises(Llama2Error, match=match) as info:
        read_gguf(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    return info.value


def variant(directory: Path, data: bytes) -> Path:
    path = directory / f"{uuid.uuid4().hex}.gguf"
    path.write_bytes(data)
    return path


def patched(path: Path, offset: int, fmt: str, value) -> bytes:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


def field_value_offset(path: Path, key: str) -> int:
    """Byte offset just past a key/value entry's value type (where its value starts)."""
    field = gguf.GGUFReader(path).fields[key]
    return field.offset + 8 + len(key.encode()) + 4


# ---------------------------------------------------------------------------
# Reading


def test_every_tensor_matches_the_independent_decode(untied):
    _, expected, checkpoint = untied
    assert isinstance(checkpoint, Checkpoint)
    assert checkpoint.state_dict.keys() == expected.keys()
    for name, want in expected.items():
        got = checkpoint.state_dict[name]
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        assert torch.equal(got, want), name


def test_model_args_come_from_the_metadata(untied):
    args = untied[2].args
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (DIM, N_LAYERS, N_HEADS, N_KV_HEADS)
    assert (args.hidden_dim, args.vocab_size, args.max_seq_len) == (HIDDEN, VOCAB, CONTEXT)
    assert args.rope_theta == 50000.0
    assert args.norm_eps == 1e-5
    assert args.tie_word_embeddings is False


def test_checkpoint_fields(untied):
    path, _, checkpoint = untied
    assert checkpoint.format == "gguf"
    assert checkpoint.source == str(path)
    assert checkpoint.chat_template == CHAT_TEMPLATE
    tokenizer = checkpoint.tokenizer_metadata
    assert tokenizer["tokenizer.ggml.tokens"] == TOKENS
    assert tokenizer["tokenizer.ggml.scores"] == [float(-i) for i in range(VOCAB)]
    assert tokenizer["tokenizer.ggml.model"] == "llama"
    assert tokenizer["tokenizer.ggml.bos_token_id"] == 1
    assert checkpoint.metadata["general.architecture"] == "llama"
    assert checkpoint.metadata["general.name"] == "tiny test llama"
    assert checkpoint.metadata["llama.block_count"] == N_LAYERS
    assert not any(key.startswith("tokenizer.") for key in checkpoint.metadata)
    assert checkpoint.tensor_types["tok_embeddings.weight"] == "Q8_0"
    assert checkpoint.tensor_types["layers.0.attention.wq.weight"] == "Q4_0"
    assert checkpoint.tensor_types["layers.1.attention.wq.weight"] == "F32"
    assert checkpoint.tensor_types["layers.0.attention.wo.weight"] == "BF16"
    assert checkpoint.tensor_types.keys() == checkpoint.state_dict.keys()


def test_tied_embeddings_have_no_output_weight(files):
    path, expected = files["tied"]
    checkpoint = read_gguf(path)
    assert checkpoint.args.tie_word_embeddings is True
    assert "output.weight" not in checkpoint.state_dict
    assert checkpoint.state_dict.keys() == expected.keys()
    assert torch.equal(checkpoint.state_dict["tok_embeddings.weight"], expected["tok_embeddings.weight"])


def test_dtype_is_applied_after_decoding(files):
    path, expected = files["untied"]
    checkpoint = read_gguf(path, dtype=torch.bfloat16)
    for name, want in expected.items():
        assert torch.equal(checkpoint.state_dict[name], want.to(torch.bfloat16)), name


def test_metadata_reader_returns_plain_values(files):
    path, _ = files["untied"]
    meta = read_gguf_metadata(path)
    assert meta["GGUF.version"] == 3
    assert meta["general.architecture"] == "llama"
    assert meta["llama.attention.layer_norm_rms_epsilon"] == 1e-5
    assert meta["tokenizer.ggml.token_type"] == [1] * VOCAB
    assert type(meta["llama.block_count"]) is int


@pytest.mark.parametrize("drop", [["llama.vocab_size"], ["llama.vocab_size", "tokenizer.ggml.tokens"]])
def test_vocab_size_fallbacks(tmp_path, drop):
    path = tmp_path / "m.gguf"
    write_gguf(path, metadata={key: None for key in drop})
    assert read_gguf(path).args.vocab_size == VOCAB


def test_defaults_for_optional_keys(tmp_path):
    path = tmp_path / "m.gguf"
    kv_names = [f"blk.{i}.attn_{kv}.weight" for i in range(N_LAYERS) for kv in "kv"]
    full_kv = {name: ((DIM, DIM), T.F32) for name in kv_names}
    write_gguf(path, metadata={"llama.rope.freq_base": None, "llama.attention.head_count_kv": None}, tensors=full_kv)
    args = read_gguf(path).args
    assert args.rope_theta == 10000.0
    assert args.n_kv_heads == N_HEADS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reads_onto_cuda(untied):
    path, expected, _ = untied
    checkpoint = read_gguf(path, device="cuda")
    for name, want in expected.items():
        got = checkpoint.state_dict[name]
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), want), name


# ---------------------------------------------------------------------------
# Broken files


def test_missing_file(tmp_path):
    raises_for(tmp_path / "absent.gguf", "no such file")


def test_directory(tmp_path):
    raises_for(tmp_path, "directory")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"hello, this is a text file\n" * 4, "not a valid GGUF file .*magic"),
        (b"GGUF", "not a valid GGUF file .*version"),
        (b"GGUF\x01\x00\x00\x00" + bytes(16), "version 1 is not supported"),
        (b"GGUF\x00\x00\x00\x03" + bytes(16), "big-endian"),
    ],
)
def test_not_gguf(tmp_path, content, message):
    raises_for(variant(tmp_path, content), message)


def test_truncated_at_each_section(files):
    path, _ = files["untied"]
    data = path.read_bytes()
    reader = gguf.GGUFReader(path)
    cuts = {
        "header": 12,
        "metadata key": reader.fields["general.name"].offset + 5,
        "token list": reader.fields["tokenizer.ggml.tokens"].offset + 200,
        "tensor info": reader.tensors[0].field.offset + 3,
        "data start": reader.data_offset,
        "data middle": (reader.data_offset + len(data)) // 2,
        "last byte": len(data) - 1,
    }
    for section, cut in cuts.items():
        error = raises_for(variant(files["dir"], data[:cut]), "not a valid GGUF file")
        assert "runs past the end" in str(error) or "bytes left" in str(error), section


@pytest.mark.parametrize(
    "locate, fmt, value, message",
    [
        (lambda path: 8, "<Q", 2**60, "tensor count"),
        (lambda path: 16, "<Q", 2**60, "metadata key count"),
        (lambda path: 16, "<Q", len(base_metadata()) + 2, ""),
        (lambda path: 24, "<Q", 2**63, "metadata key #0"),
        (lambda path: field_value_offset(path, "tokenizer.ggml.tokens") + 4, "<Q", 2**60, "element count"),
        # A huge count of scalars would make GGUFReader loop for ever on empty views.
        (lambda path: field_value_offset(path, "tokenizer.ggml.scores") + 4, "<Q", 2**60, "element count"),
        (lambda path: field_value_offset(path, "tokenizer.ggml.token_type") + 4, "<Q", VOCAB + 7, ""),
        (lambda path: field_value_offset(path, "general.name") - 4, "<I", 77, "unknown value type 77"),
        (lambda path: field_value_offset(path, "tokenizer.ggml.tokens"), "<I", 99, "unknown value type 99"),
    ],
    ids=["tensors", "keys", "keys-small", "key-length", "strings", "floats", "ints", "type", "element-type"],
)
def test_corrupted_counts(files, locate, fmt, value, message):
    path, _ = files["untied"]
    damaged = variant(files["dir"], patched(path, locate(path), fmt, value))
    raises_for(damaged, f"not a valid GGUF file .*{message}")


def tensor_info_offsets(path: Path, index: int) -> dict[str, int]:
    """Byte offsets of the fields of the tensor info entry `index`."""
    tensor = gguf.GGUFReader(path).tensors[index]
    name_len, name, n_dims, dims, qtype, offset = (int(p.nbytes) for p in tensor.field.parts)
    start = tensor.field.offset
    return {
        "n_dims": start + name_len + name,
        "dim0": start + name_len + name + n_dims,
        "type": start + name_len + name + n_dims + dims,
        "offset": start + name_len + name + n_dims + dims + qtype,
    }


@pytest.mark.parametrize(
    "field, fmt, value, message",
    [
        ("n_dims", "<I", 9, "9 dimensions"),
        ("dim0", "<Q", 2**62, "runs past the end"),
        ("dim0", "<Q", 33, "not a multiple of the Q8_0 block size"),
        ("type", "<I", 1234, "unknown GGML type 1234"),
        ("offset", "<Q", 2**40, "runs past the end"),
        ("offset", "<Q", 8, "not aligned"),
    ],
)
def test_corrupted_tensor_info(files, field, fmt, value, message):
    path, _ = files["untied"]
    offset = tensor_info_offsets(path, 0)[field]  # token_embd.weight, Q8_0
    raises_for(variant(files["dir"], patched(path, offset, fmt, value)), f"not a valid GGUF file .*{message}")


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_damage_gives_a_checkpoint_or_llama2error(files, data):
    path, _ = files["untied"]
    content = bytearray(path.read_bytes())
    header_end = files["header_end"]
    if data.draw(st.booleans(), label="truncate"):
        content = content[: data.draw(st.integers(0, len(content) - 1), label="cut")]
    else:
        for _ in range(data.draw(st.integers(1, 4), label="n_flips")):
            at = data.draw(st.integers(0, header_end - 1), label="at")
            content[at] = data.draw(st.integers(0, 255), label="byte")
    damaged = variant(files["dir"], bytes(content))
    try:
        read_gguf(damaged)
    except Llama2Error as error:
        assert str(damaged) in str(error)
    finally:
        os.unlink(damaged)


# ---------------------------------------------------------------------------
# Valid GGUF, wrong model


def u32(value: int) -> tuple[int, V]:
    return value, V.UINT32


@pytest.mark.parametrize(
    "metadata, message",
    [
        (
            {"llama.feed_forward_length": u32(HIDDEN * 2)},
            r"ffn_gate\.weight has shape \[128, 64\], expected \[256, 64\]",
        ),
        ({"llama.attention.head_count_kv": u32(N_HEADS)}, r"attn_k\.weight has shape \[32, 64\], expected \[64, 64\]"),
        ({"llama.embedding_length": u32(DIM * 2), "llama.rope.dimension_count": None}, r"\[100, 128\]"),
        ({"llama.vocab_size": u32(VOCAB + 1)}, r"token_embd\.weight has shape \[100, 64\], expected \[101, 64\]"),
        ({"llama.block_count": u32(N_LAYERS + 1)}, r"missing 9 tensors: blk\.2\.attn_q\.weight"),
        ({"llama.block_count": (2**40, V.UINT64)}, r"missing \d+ tensors: blk\.2\.attn_q\.weight"),
        ({"llama.block_count": u32(N_LAYERS - 1)}, r"blk\.1\..* do not belong to a 1-layer model"),
        ({"llama.embedding_length": None}, "missing metadata key llama.embedding_length"),
        ({"llama.block_count": ("two", V.STRING)}, "llama.block_count must be an integer"),
        ({"llama.attention.head_count": u32(5)}, "not divisible by n_heads 5"),
        ({"llama.rope.scaling.type": ("linear", V.STRING)}, "unsupported RoPE scaling type 'linear'"),
        ({"llama.rope.scaling.factor": (4.0, V.FLOAT32)}, "unsupported RoPE scaling factor"),
        ({"llama.rope.dimension_count": u32(HEAD_DIM // 2)}, "llama.rope.dimension_count"),
        ({"llama.expert_count": u32(8)}, "mixture-of-experts"),
    ],
    ids=[
        "ffn",
        "kv-heads",
        "dim",
        "vocab",
        "layers+1",
        "layers-huge",
        "layers-1",
        "no-dim",
        "str-layers",
        "heads",
        "rope-type",
        "rope-factor",
        "rope-dims",
        "experts",
    ],
)
def test_metadata_contradicting_the_model(tmp_path, metadata, message):
    path = tmp_path / "m.gguf"
    write_gguf(path, metadata=metadata)
    raises_for(path, message)


def test_missing_architecture(files):
    path, _ = files["untied"]
    renamed = path.read_bytes().replace(b"general.architecture", b"general.architecturX", 1)
    raises_for(variant(files["dir"], renamed), "missing metadata key general.architecture")


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"blk.0.attn_q.bias": ((DIM,), T.F32)}, r"unknown tensors blk\.0\.attn_q\.bias"),
        ({"rope_freqs.weight": ((HEAD_DIM // 2,), T.F32)}, "rope_freqs"),
        ({"output_norm.weight": None}, r"missing 1 tensors: output_norm\.weight"),
        ({"blk.1.ffn_up.weight": ((HIDDEN, DIM + 32), T.Q8_0)}, r"blk\.1\.ffn_up\.weight has shape \[128, 96\]"),
    ],
    ids=["bias", "rope-freqs", "missing", "shape"],
)
def test_tensors_contradicting_the_model(tmp_path, tensors, message):
    path = tmp_path / "m.gguf"
    write_gguf(path, tensors=tensors)
    raises_for(path, message)


def test_tensor_of_a_type_nothing_decodes(files):
    path, _ = files["untied"]
    names = [t.name for t in gguf.GGUFReader(path).tensors]
    offset = tensor_info_offsets(path, names.index("output_norm.weight"))["type"]  # F32 -> I32, same size
    damaged = variant(files["dir"], patched(path, offset, "<I", int(T.I32)))
    raises_for(damaged, r"tensor output_norm\.weight: cannot dequantize GGML type I32")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, arch="gpt2")
    raises_for(path, "unsupported architecture 'gpt2'")


def test_dtype_must_be_floating(files):
    raises_for(files["untied"][0], "floating-point", dtype=torch.int8)


# ---------------------------------------------------------------------------
# The real default model


@pytest.mark.model
def test_smollm2_135m_instruct_q4_1(default_model_path):
    checkpoint = read_gguf(default_model_path)
    args = checkpoint.args
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads) == (576, 30, 9, 3)
    assert (args.hidden_dim, args.vocab_size, args.rope_theta) == (1536, 49152, 100000.0)
    assert args.tie_word_embeddings is True
    assert "output.weight" not in checkpoint.state_dict
    assert len(checkpoint.tokenizer_metadata["tokenizer.ggml.tokens"]) == 49152
    assert checkpoint.chat_template.startswith("{% for message in messages %}")
    reader = gguf.GGUFReader(default_model_path)
    tensors = {t.name: t for t in reader.tensors}
    for name, meta, qtype in [
        ("token_embd.weight", "tok_embeddings.weight", "Q8_0"),
        ("blk.3.ffn_down.weight", "layers.3.feed_forward.w2.weight", "Q4_1"),
    ]:
        tensor = tensors[name]
        assert tensor.tensor_type.name == qtype == checkpoint.tensor_types[meta]
        assert torch.equal(checkpoint.state_dict[meta], decode(tensor.data, tensor.tensor_type))
