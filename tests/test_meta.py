"""Meta checkpoint folders: write_meta/read_meta round trips in 1, 2 and 8 shards, split layout, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama2.weights import read_hf, read_meta, write_meta

from helpers import assert_matches_reference, expect_error, make_hf_llama, our_model, random_tokens


def _model(folder: Path, **kwargs):
    # Every split dimension divides by 8: dim 64, 16 heads of 4, 8 KV heads (kv dim 32), FFN 192, vocab 128.
    hf_model = make_hf_llama(
        folder, seed=11, hidden_size=64, num_heads=16, num_kv_heads=8, intermediate_size=192, **kwargs
    )
    return hf_model, read_hf(folder)


def _architecture(args) -> tuple:
    # Meta's params.json has no context length, and may encode hidden_dim with another multiple_of.
    return (
        args.dim,
        args.n_layers,
        args.n_heads,
        args.n_kv_heads,
        args.vocab_size,
        args.hidden_dim,
        args.norm_eps,
        args.rope_theta,
        args.tie_word_embeddings,
    )


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """(transformers model, checkpoint read from it) for a GQA model with rope_theta 500000."""
    return _model(tmp_path_factory.mktemp("hf-gqa"), rope_theta=500000.0)


@pytest.fixture()
def written(gqa, tmp_path) -> Path:
    """The GQA model written as a 2-shard Meta folder."""
    return write_meta(gqa[1].args, gqa[1].state_dict, tmp_path / "meta", num_shards=2)


@pytest.mark.parametrize("num_shards", [1, 2, 8])
def test_round_trip(gqa, tmp_path, num_shards):
    hf_model, checkpoint = gqa
    write_meta(checkpoint.args, checkpoint.state_dict, tmp_path, num_shards=num_shards)

    loaded = read_meta(tmp_path)

    assert sorted(p.name for p in tmp_path.glob("consolidated.*.pth")) == [
        f"consolidated.{i:02d}.pth" for i in range(num_shards)
    ]
    assert _architecture(loaded.args) == _architecture(checkpoint.args) and loaded.format == "meta"
    assert loaded.state_dict.keys() == checkpoint.state_dict.keys()
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in checkpoint.state_dict.items())
    assert_matches_reference(our_model(loaded), hf_model, random_tokens(128))


def test_tied_mha_with_free_ffn_width(tmp_path):
    # 8 heads of 8, no GQA, tied embeddings, an FFN width Llama 2's rule does not give for dim 64.
    hf_model = make_hf_llama(tmp_path / "hf", seed=5, num_heads=8, intermediate_size=104, tie=True)
    checkpoint = read_hf(tmp_path / "hf")

    loaded = read_meta(write_meta(checkpoint.args, checkpoint.state_dict, tmp_path / "meta", num_shards=8))

    assert loaded.args.hidden_dim == 104 and not loaded.args.tie_word_embeddings
    assert torch.equal(loaded.state_dict["output.weight"], checkpoint.state_dict["tok_embeddings.weight"])
    assert_matches_reference(our_model(loaded), hf_model, random_tokens(128))


def test_shards_split_along_meta_dimensions(written, gqa):
    whole = gqa[1].state_dict
    shard = torch.load(written / "consolidated.00.pth", weights_only=True)
    halves = {
        "tok_embeddings.weight": (128, 32),  # ParallelEmbedding: columns
        "layers.0.attention.wq.weight": (32, 64),  # ColumnParallel: rows
        "layers.0.attention.wk.weight": (16, 64),
        "layers.0.attention.wv.weight": (16, 64),
        "layers.0.attention.wo.weight": (64, 32),  # RowParallel: columns
        "layers.0.feed_forward.w1.weight": (96, 64),
        "layers.0.feed_forward.w2.weight": (64, 96),
        "layers.0.feed_forward.w3.weight": (96, 64),
        "output.weight": (64, 64),
        "layers.0.attention_norm.weight": (64,),  # replicated
        "norm.weight": (64,),
    }
    for name, shape in halves.items():
        assert tuple(shard[name].shape) == shape, name
    assert torch.equal(shard["layers.0.attention.wo.weight"], whole["layers.0.attention.wo.weight"][:, :32])
    assert torch.equal(shard["tok_embeddings.weight"], whole["tok_embeddings.weight"][:, :32])


def test_params_json(written):
    params = json.loads((written / "params.json").read_text())
    assert params == {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 16,
        "n_kv_heads": 8,
        "vocab_size": 128,
        "multiple_of": 192,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
    }


def test_vocab_minus_one_and_rope_freqs(written):
    params = json.loads((written / "params.json").read_text())
    (written / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    for path in written.glob("consolidated.*.pth"):
        shard = torch.load(path, weights_only=True)
        torch.save({**shard, "rope.freqs": torch.ones(2)}, path)
    loaded = read_meta(written)
    assert loaded.args.vocab_size == 128 and "rope.freqs" not in loaded.state_dict


def test_bf16_and_stale_shards(gqa, tmp_path):
    args, state_dict = gqa[1].args, {k: v.bfloat16() for k, v in gqa[1].state_dict.items()}
    write_meta(args, state_dict, tmp_path, num_shards=8)
    write_meta(args, state_dict, tmp_path, num_shards=1)
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".pth"] == ["consolidated.00.pth"]
    loaded = read_meta(tmp_path, dtype=torch.bfloat16)
    assert set(loaded.tensor_types.values()) == {"BF16"}
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in state_dict.items())


# --- errors ---------------------------------------------------------------------------


def test_write_indivisible_shards(gqa, tmp_path):
    expect_error(lambda: write_meta(gqa[1].args, gqa[1].state_dict, tmp_path, num_shards=3), "3 shards")
    assert not list(tmp_path.iterdir())


def test_write_state_dict_mismatch(gqa, tmp_path):
    state_dict = dict(gqa[1].state_dict)
    del state_dict["norm.weight"]
    expect_error(lambda: write_meta(gqa[1].args, state_dict, tmp_path), "missing", "norm.weight")


def test_missing_folder(tmp_path):
    expect_error(lambda: read_meta(tmp_path / "nope"), "nope", "no such directory")


def test_missing_params(written):
    (written / "params.json").unlink()
    expect_error(lambda: read_meta(written), written, "params.json")


def test_no_shards(written):
    for path in written.glob("*.pth"):
        path.unlink()
    expect_error(lambda: read_meta(written), written, "no consolidated")


def test_gap_in_shard_numbering(written):
    (written / "consolidated.01.pth").rename(written / "consolidated.02.pth")
    expect_error(lambda: read_meta(written), written, "consolidated.01.pth is missing")


@pytest.mark.parametrize("content", [b"", b"garbage bytes", b"PK\x03\x04broken zip"], ids=["empty", "text", "zip"])
def test_not_a_torch_file(written, content):
    (written / "consolidated.01.pth").write_bytes(content)
    expect_error(lambda: read_meta(written), "consolidated.01.pth", "not a readable PyTorch checkpoint")


def test_not_a_dict_of_tensors(written):
    torch.save([torch.ones(1)], written / "consolidated.00.pth")
    expect_error(lambda: read_meta(written), "consolidated.00.pth", "dict of named tensors")


def test_unknown_key(written):
    for path in written.glob("consolidated.*.pth"):
        torch.save({**torch.load(path, weights_only=True), "layers.0.attention.wq.bias": torch.ones(2)}, path)
    expect_error(lambda: read_meta(written), written, "unexpected tensor layers.0.attention.wq.bias")


def test_shards_disagree(written):
    path = written / "consolidated.01.pth"
    shard = torch.load(path, weights_only=True)
    del shard["norm.weight"]
    torch.save(shard, path)
    expect_error(lambda: read_meta(written), "shard 01", "norm.weight")


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"n_layers": 3}, "missing tensor(s) layers.2."),
        ({"multiple_of": 256}, "feed_forward.w1.weight has shape [192, 64] but the config implies [256, 64]"),
        ({"n_kv_heads": 4}, "attention.wk.weight has shape [32, 64]"),
        ({"dim": 60}, "invalid model config"),
        ({"use_scaled_rope": True}, "use_scaled_rope"),
    ],
)
def test_params_contradict_weights(written, change, needle):
    params = json.loads((written / "params.json").read_text())
    (written / "params.json").write_text(json.dumps({**params, **change}))
    expect_error(lambda: read_meta(written), written, needle)


def test_missing_param(written):
    params = json.loads((written / "params.json").read_text())
    del params["dim"]
    (written / "params.json").write_text(json.dumps(params))
    expect_error(lambda: read_meta(written), "params.json", "missing dim")
