"""Conversions between Meta, Hugging Face and GGUF.

References: bitwise round trips through every format; `transformers` loading our
Hugging Face output (logits, tokenizer, no load-report warnings); `gguf.GGUFReader` and
`gguf.quants.quantize` for the GGUF files we write; `sentencepiece` for the vocabulary.
"""

from __future__ import annotations

import io
import logging
import warnings
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llama2.cli import main
from llama2.errors import Llama2Warning
from llama2.tokenizer import Tokenizer, llama2_tokenizer_path
from llama2.weights import Checkpoint, read_gguf, read_hf, read_meta, write_gguf, write_hf, write_meta
from llama2.weights.checkpoint import LazyStateDict, lazy
from llama2.weights.convert import convert

from convert_helpers import architecture, assert_bitwise_equal, random_state_dict, tiny_args
from helpers import assert_matches_reference, expect_error, our_model, random_tokens

pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer found:llama2.errors.Llama2Warning")

# GGUF tensor names, spelled out independently of the library's table.
GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    **{
        f"blk.{i}.{theirs}.weight": f"layers.{i}.{ours}.weight"
        for i in range(2)
        for theirs, ours in {
            "attn_q": "attention.wq",
            "attn_k": "attention.wk",
            "attn_v": "attention.wv",
            "attn_output": "attention.wo",
            "ffn_gate": "feed_forward.w1",
            "ffn_down": "feed_forward.w2",
            "ffn_up": "feed_forward.w3",
            "attn_norm": "attention_norm",
            "ffn_norm": "ffn_norm",
        }.items()
    },
}
TEXTS = ["Hello world", "The capital of France is Paris.", "naïve café, 2024: x = y + 1;\nnew line"]


def gguf_tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    """Canonical name -> tensor, as gguf-py's own reader sees the file."""
    return {GGUF_NAMES[t.name]: t for t in gguf.GGUFReader(path).tensors}


def gguf_field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


# ---------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("num_shards", [1, 2, 8])
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_meta_hf_gguf_meta_round_trip_is_exact(tmp_path, gqa, num_shards):
    args = tiny_args(gqa=gqa)
    original = random_state_dict(args, seed=num_shards)
    write_meta(args, original, tmp_path / "meta", num_shards)

    convert(tmp_path / "meta", tmp_path / "hf", "hf", max_shard_bytes=40_000)
    convert(tmp_path / "hf", tmp_path / "model.gguf", "gguf", tensor_type="f32")
    convert(tmp_path / "model.gguf", tmp_path / "back", "meta", num_shards=num_shards)

    back = read_meta(tmp_path / "back")
    assert architecture(back.args) == architecture(args)
    assert_bitwise_equal(back.state_dict, original)
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    # GGUF keeps Meta's layout: gguf-py's reader sees the original rows.
    for name, tensor in gguf_tensors(tmp_path / "model.gguf").items():
        assert tensor.tensor_type == T.F32 and np.array_equal(np.asarray(tensor.data), original[name].numpy()), name
    for shard in (tmp_path / "back").glob("consolidated.*.pth"):
        assert zipfile.ZipFile(shard).testzip() is None  # every record's CRC is right


def test_bf16_round_trip_keeps_dtype(tmp_path):
    args = tiny_args()
    original = random_state_dict(args, seed=4, dtype=torch.bfloat16)
    write_meta(args, original, tmp_path / "meta", 2)
    convert(tmp_path / "meta", tmp_path / "hf", "hf")
    convert(tmp_path / "hf", tmp_path / "model.gguf", "gguf")  # auto: BF16 matrices, F32 norms
    convert(tmp_path / "hf", tmp_path / "back", "meta")

    assert_bitwise_equal(read_meta(tmp_path / "back", dtype=torch.bfloat16).state_dict, original)
    types = {name: t.tensor_type for name, t in gguf_tensors(tmp_path / "model.gguf").items()}
    assert types["norm.weight"] == T.F32 and types["layers.0.attention.wq.weight"] == T.BF16
    from_gguf = read_gguf(tmp_path / "model.gguf", dtype=torch.bfloat16).state_dict
    assert all(torch.equal(from_gguf[name], tensor) for name, tensor in original.items())


def test_dtype_option_casts(tmp_path):
    args = tiny_args()
    write_hf(args, random_state_dict(args), tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "meta", "meta", dtype="bfloat16")
    assert set(read_meta(tmp_path / "meta", dtype=torch.bfloat16).tensor_types.values()) == {"BF16"}


# ---------------------------------------------------------------------------------------
# Hugging Face output against transformers


@pytest.fixture()
def transformers_log():
    """Everything transformers logs (its load report lists missing and unexpected keys)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_transformers_gives_our_logits(tmp_path, transformers_log, tie):
    transformers = pytest.importorskip("transformers")
    # 4 heads of 16, 2 KV heads: q/k rows are permuted within heads of 8 pairs.
    args = tiny_args(n_heads=4, n_kv_heads=2, hidden_dim=96, tie=tie)
    state_dict = random_state_dict(args, seed=5)
    write_hf(args, state_dict, tmp_path, max_shard_bytes=30_000)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float()

    assert transformers_log.getvalue() == ""  # no missing/unexpected keys
    assert reference.config.tie_word_embeddings == tie
    ours = our_model(Checkpoint(args=args, state_dict=state_dict))
    assert_matches_reference(ours, reference.eval(), random_tokens(args.vocab_size), atol=1e-4)


@pytest.fixture(scope="module")
def llama_vocab(tmp_path_factory):
    """A tiny model with Llama 2's 32000-token vocabulary, written as an HF folder with Meta's tokenizer."""
    folder = tmp_path_factory.mktemp("llama-vocab") / "hf"
    args = tiny_args(vocab_size=32000)
    tokenizer = Tokenizer.from_file(llama2_tokenizer_path())
    write_hf(args, random_state_dict(args, seed=6), folder, tokenizer=tokenizer, chat_template="{{ 'x' }}")
    return folder, args


def test_hf_tokenizer_files_load_in_transformers(llama_vocab, transformers_log):
    transformers = pytest.importorskip("transformers")
    folder, _ = llama_vocab
    reference = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_path()))

    loaded = transformers.AutoTokenizer.from_pretrained(folder)

    assert (folder / "tokenizer.model").read_bytes() == llama2_tokenizer_path().read_bytes()
    for text in TEXTS:
        assert loaded(text)["input_ids"] == [1, *reference.encode(text)], text
    assert (loaded.bos_token, loaded.eos_token, loaded.unk_token) == ("<s>", "</s>", "<unk>")
    assert loaded.chat_template == "{{ 'x' }}"
    config = transformers.AutoConfig.from_pretrained(folder)
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert transformers_log.getvalue() == ""


def test_llama2_vocabulary_in_gguf(llama_vocab, tmp_path):
    folder, args = llama_vocab
    reference = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_path()))
    path = convert(folder, tmp_path / "model.gguf", "gguf", tensor_type="q8_0")

    reader = gguf.GGUFReader(path)
    n = reference.get_piece_size()
    assert gguf_field(reader, "tokenizer.ggml.model") == "llama"
    assert gguf_field(reader, "tokenizer.ggml.tokens") == [reference.id_to_piece(i) for i in range(n)]
    assert np.allclose(gguf_field(reader, "tokenizer.ggml.scores"), [reference.get_score(i) for i in range(n)])
    kinds = gguf_field(reader, "tokenizer.ggml.token_type")

    def kind(i: int) -> int:  # llama.cpp's token types
        return 3 if reference.is_control(i) else 2 if reference.is_unknown(i) else 6 if reference.is_byte(i) else 1

    expected_kinds = [kind(i) for i in range(n)]
    assert kinds == expected_kinds
    ids = {key: gguf_field(reader, f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "unknown")}
    assert ids == {"bos": 1, "eos": 2, "unknown": 0}
    assert gguf_field(reader, "tokenizer.ggml.add_bos_token") is True
    assert gguf_field(reader, "tokenizer.chat_template") == "{{ 'x' }}"
    expected = {
        "llama.context_length": 64,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 192,
        "llama.attention.head_count": 16,
        "llama.attention.head_count_kv": 8,
        "llama.rope.dimension_count": 4,
        "llama.vocab_size": 32000,
        "general.architecture": "llama",
        "general.file_type": 7,
    }
    assert {key: gguf_field(reader, key) for key in expected} == expected
    assert gguf_field(reader, "llama.rope.freq_base") == 500000.0
    assert abs(gguf_field(reader, "llama.attention.layer_norm_rms_epsilon") - 1e-5) < 1e-12
    # ... and back to Meta: tokenizer.model encodes as Meta's.
    meta = convert(path, tmp_path / "meta", "meta")
    rebuilt = spm.SentencePieceProcessor(model_file=str(meta / "tokenizer.model"))
    assert all(rebuilt.encode(text) == reference.encode(text) for text in TEXTS)
    assert read_meta(meta).args.vocab_size == args.vocab_size


@pytest.mark.model
def test_bpe_vocabulary_travels(default_model_path, tmp_path):
    """SmolLM2's byte-level BPE: rebuilt GGUF keys match the original file's; transformers reads our HF files."""
    transformers = pytest.importorskip("transformers")
    from llama2.weights.gguf import read_gguf_metadata
    from llama2.weights.tokenizer_files import gguf_tokenizer_metadata, write_hf_tokenizer, write_meta_tokenizer

    original = read_gguf_metadata(default_model_path)
    tokenizer = Tokenizer.from_gguf_metadata(original)

    rebuilt = gguf_tokenizer_metadata(tokenizer)
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "model"):
        assert rebuilt[f"tokenizer.ggml.{key}"] == original[f"tokenizer.ggml.{key}"], key
    assert rebuilt["tokenizer.chat_template"] == original["tokenizer.chat_template"]
    assert rebuilt["tokenizer.ggml.pre"] in ("smollm", "starcoder")  # one splitting, two names in llama.cpp

    write_hf_tokenizer(tmp_path, tokenizer, None, 2048)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in [*TEXTS, "  1234 tokens\t<|im_start|>"]:
        assert loaded(text, add_special_tokens=False)["input_ids"] == tokenizer.encode_with_special(text), text
    assert loaded.eos_token == tokenizer.eos_token and loaded.chat_template == tokenizer.chat_template

    (tmp_path / "meta").mkdir()
    with pytest.warns(Llama2Warning, match="byte-level BPE"):
        write_meta_tokenizer(tmp_path / "meta", tokenizer, None)
    assert Tokenizer.from_file(tmp_path / "meta").encode("Hello world", bos=False, eos=False) == tokenizer.encode(
        "Hello world", bos=False, eos=False
    )


# ---------------------------------------------------------------------------------------
# GGUF quantization against gguf.quants


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_quantized_blocks_equal_gguf_quantize(tmp_path, kind, tie):
    args = tiny_args(tie=tie)
    state_dict = random_state_dict(args, seed=8)
    path = write_gguf(args, state_dict, tmp_path / "model.gguf", tensor_type=kind)

    requested = T[kind.upper()]
    head = "tok_embeddings.weight" if tie else "output.weight"
    back = read_gguf(path).state_dict
    for name, tensor in gguf_tensors(path).items():
        # llama.cpp's choices: norms F32; the output head Q8_0 rather than Q6_K in 4-bit files.
        expected_type = T.F32 if name.endswith("norm.weight") else T.Q8_0 if name == head else requested
        assert tensor.tensor_type == expected_type, name
        blocks = gguf_quantize(state_dict[name].numpy(), expected_type)
        written = np.asarray(tensor.data).reshape(-1).view(np.uint8)
        assert np.array_equal(written, blocks.reshape(-1).view(np.uint8)), name
        decoded = torch.from_numpy(np.ascontiguousarray(gguf_dequantize(blocks, expected_type), dtype=np.float32))
        assert torch.equal(back[name], decoded.reshape(back[name].shape)), name
        bound = {T.F32: 0.0, T.Q8_0: 0.005, T.Q4_0: 0.08, T.Q4_1: 0.05}[expected_type]
        assert (back[name] - state_dict[name]).abs().mean() <= bound, name
    assert gguf_field(gguf.GGUFReader(path), "general.quantization_version") == 2


def test_rows_not_divisible_by_blocks_fall_back_to_f16(tmp_path):
    args = tiny_args(dim=48, n_heads=12, n_kv_heads=6, hidden_dim=80)  # rows of 48 and 80 values
    state_dict = random_state_dict(args)
    path = write_gguf(args, state_dict, tmp_path / "m.gguf", tensor_type="q4_0")
    types = {name: t.tensor_type for name, t in gguf_tensors(path).items()}
    assert types["layers.0.feed_forward.w1.weight"] == T.F16 and types["norm.weight"] == T.F32


# ---------------------------------------------------------------------------------------
# Streaming and integrity


class CountingLoads:
    """A lazy state dict that counts reads and fails on the `fail_at`-th one."""

    def __init__(self, state_dict: dict, fail_at: int | None = None):
        self.reads: list[str] = []
        self.fail_at = fail_at
        base = lazy(state_dict)
        self.tensors = LazyStateDict({name: base.spec(name) for name in base}, self._load)
        self._base = base

    def _load(self, name: str) -> torch.Tensor:
        self.reads.append(name)
        if len(self.reads) == self.fail_at:
            raise KeyboardInterrupt  # like a signal midway
        return self._base[name]


WRITERS = {
    "meta": lambda args, tensors, dest: write_meta(args, tensors, dest, 2),
    "hf": lambda args, tensors, dest: write_hf(args, tensors, dest, max_shard_bytes=30_000),
    "gguf": lambda args, tensors, dest: write_gguf(args, tensors, dest, tensor_type="q8_0"),
}


@pytest.mark.parametrize("fmt", WRITERS)
def test_writers_read_each_tensor_once(tmp_path, fmt):
    args = tiny_args()
    counting = CountingLoads(random_state_dict(args))
    WRITERS[fmt](args, counting.tensors, tmp_path / "out")
    assert sorted(counting.reads) == sorted(counting.tensors)


@pytest.mark.parametrize("fmt", WRITERS)
def test_interrupted_write_leaves_nothing(tmp_path, fmt):
    args = tiny_args()
    counting = CountingLoads(random_state_dict(args), fail_at=9)
    with pytest.raises(KeyboardInterrupt):
        WRITERS[fmt](args, counting.tensors, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_replaces_existing_output_whole(tmp_path):
    args = tiny_args()
    write_meta(args, random_state_dict(args), tmp_path / "out", 8)
    (tmp_path / "out" / "stale.txt").write_text("x")
    write_meta(args, random_state_dict(args, seed=1), tmp_path / "out", 1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["consolidated.00.pth", "params.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_nan_weights_warn(tmp_path):
    args = tiny_args()
    state_dict = random_state_dict(args)
    state_dict["layers.1.attention.wk.weight"][3, 5] = float("nan")
    write_hf(args, state_dict, tmp_path)
    with pytest.warns(Llama2Warning, match=r"model\.safetensors|layers\.1\.attention\.wk\.weight has 1 NaN/Inf"):
        read_hf(tmp_path)


def test_truncated_meta_shard(tmp_path):
    args = tiny_args()
    folder = write_meta(args, random_state_dict(args), tmp_path / "meta", 2)
    shard = folder / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[:-200])
    expect_error(lambda: read_meta(folder), "consolidated.01.pth", "not a readable PyTorch checkpoint")


# ---------------------------------------------------------------------------------------
# Errors


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    args = tiny_args()
    return write_hf(args, random_state_dict(args), tmp_path_factory.mktemp("src") / "hf")


@pytest.mark.parametrize(
    "to, options, needle",
    [
        ("onnx", {}, "unknown output format 'onnx'"),
        ("hf", {"num_shards": 2}, "num_shards applies to meta output only"),
        ("meta", {"tensor_type": "q4_0"}, "tensor_type applies to gguf output only"),
        ("gguf", {"tensor_type": "q3_k"}, "unknown GGUF tensor type 'q3_k'"),
        ("meta", {"num_shards": 3}, "cannot split n_heads = 16 heads into 3 shards"),
        ("meta", {"dtype": "int8"}, "unknown dtype 'int8'"),
    ],
)
def test_bad_options(hf_folder, tmp_path, to, options, needle):
    expect_error(lambda: convert(hf_folder, tmp_path / "out", to, **options), needle)
    assert not (tmp_path / "out").exists()


def test_destination_checks(hf_folder, tmp_path):
    expect_error(lambda: convert(hf_folder, hf_folder, "hf"), "would replace the source")
    expect_error(lambda: convert(hf_folder, hf_folder.parent, "hf"), "would replace the source")
    (tmp_path / "taken.gguf").write_bytes(b"x")
    expect_error(lambda: convert(hf_folder, tmp_path / "taken.gguf", "gguf"), "already exists", "--force")
    convert(hf_folder, tmp_path / "taken.gguf", "gguf", overwrite=True)
    assert read_gguf(tmp_path / "taken.gguf").args.dim == 64


def test_gguf_vocabulary_must_match_embeddings(hf_folder, tmp_path):
    expect_error(
        lambda: convert(hf_folder, tmp_path / "m.gguf", "gguf", tokenizer_path=llama2_tokenizer_path()),
        "32000 tokens but the model has 128 embeddings",
    )


def test_cli_convert(hf_folder, tmp_path, capsys):
    assert main(["convert", str(hf_folder), str(tmp_path / "m.gguf"), "--to", "gguf", "--type", "q4_0"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "m.gguf")
    assert err.strip().splitlines() == [
        f"llama2: warning: {hf_folder}: no tokenizer found next to the checkpoint; "
        "writing the weights without one (pass --tokenizer)"
    ]
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 1
    assert capsys.readouterr().err.startswith("llama2: error: ")
