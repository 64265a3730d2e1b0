"""Hugging Face reader: logits equal transformers' own LlamaForCausalLM; bad folders raise Llama2Error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama2.weights import read_hf
from llama2.weights.hf import args_from_hf_config

from helpers import assert_matches_reference, expect_error, make_hf_llama, our_model, random_tokens

BASE_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, object]:
    """A saved untied GQA model (folder, transformers model), to copy and break."""
    folder = tmp_path_factory.mktemp("hf-base")
    return folder, make_hf_llama(folder, gqa=True, seed=3)


@pytest.fixture()
def broken(base, tmp_path) -> Path:
    """A private copy of the base folder to damage."""
    return Path(shutil.copytree(base[0], tmp_path / "model"))


@pytest.mark.parametrize(
    "gqa, tie, shard, rope_theta",
    [
        (False, False, None, 10000.0),
        (True, False, "40KB", 500000.0),
        (True, True, None, 10000.0),
        (False, True, "40KB", 500000.0),
    ],
    ids=["mha", "gqa-sharded-theta5e5", "gqa-tied", "mha-tied-sharded"],
)
def test_logits_match_transformers(tmp_path, gqa, tie, shard, rope_theta):
    hf_model = make_hf_llama(tmp_path, gqa=gqa, tie=tie, seed=7, rope_theta=rope_theta, max_shard_size=shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard is not None)

    checkpoint = read_hf(tmp_path)

    args = checkpoint.args
    assert (args.n_kv_heads, args.tie_word_embeddings, args.rope_theta) == (2 if gqa else 4, tie, rope_theta)
    assert ("output.weight" in checkpoint.state_dict) == (not tie)
    assert checkpoint.format == "hf" and set(checkpoint.tensor_types.values()) == {"F32"}
    assert_matches_reference(our_model(checkpoint), hf_model, random_tokens(args.vocab_size))


def test_args_from_config(base):
    args = read_hf(base[0]).args
    assert (args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.vocab_size) == (64, 96, 2, 4, 128)
    assert (args.norm_eps, args.max_seq_len) == (1e-5, 64)


def test_dtype_and_pytorch_bin(base, tmp_path):
    folder, hf_model = base
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")

    from_bin = read_hf(tmp_path, dtype=torch.bfloat16)
    from_safetensors = read_hf(folder)

    assert from_bin.state_dict.keys() == from_safetensors.state_dict.keys()
    for name, tensor in from_bin.state_dict.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, from_safetensors.state_dict[name].bfloat16())
    assert set(from_bin.tensor_types.values()) == {"F32"}


def test_missing_lm_head_means_tied(broken, base):
    weights = load_file(broken / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, broken / "model.safetensors")
    checkpoint = read_hf(broken)
    assert checkpoint.args.tie_word_embeddings and "output.weight" not in checkpoint.state_dict


@pytest.mark.parametrize(
    "changes, theta",
    [
        ({"rope_theta": 500000.0, "rope_scaling": None}, 500000.0),  # transformers 4
        ({"rope_parameters": {"rope_theta": 250000.0, "rope_type": "default"}}, 250000.0),  # transformers 5
        ({}, 10000.0),
    ],
)
def test_rope_theta_forms(changes, theta):
    assert args_from_hf_config({**BASE_CONFIG, **changes}, Path("config.json")).rope_theta == theta


def test_mistral_sliding_window_caps_context():
    config = {**BASE_CONFIG, "model_type": "mistral", "max_position_embeddings": 32768, "sliding_window": 4096}
    assert args_from_hf_config(config, Path("config.json")).max_seq_len == 4096


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
        ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "linear"}}, "linear"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"head_dim": 32}, "head_dim"),
        ({"model_type": "gpt2"}, "gpt2"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"rope_theta": "big"}, "rope_theta"),
        ({"num_attention_heads": 5}, "not divisible"),
    ],
)
def test_unsupported_config(changes, needle):
    expect_error(lambda: args_from_hf_config({**BASE_CONFIG, **changes}, Path("cfg/config.json")), "cfg", needle)


def test_chat_template_sources(broken):
    assert read_hf(broken).chat_template is None
    config = broken / "tokenizer_config.json"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config.write_text(json.dumps({"chat_template": named}))
    assert read_hf(broken).chat_template == "D"
    config.write_text(json.dumps({"chat_template": "S"}))
    assert read_hf(broken).chat_template == "S"
    (broken / "chat_template.jinja").write_text("J")
    assert read_hf(broken).chat_template == "J"


# --- errors ---------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    expect_error(lambda: read_hf(tmp_path / "nope"), "nope", "no such directory")


def test_not_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    expect_error(lambda: read_hf(tmp_path / "file"), "file", "not a directory")


def test_missing_config(broken):
    (broken / "config.json").unlink()
    expect_error(lambda: read_hf(broken), broken, "config.json")


def test_corrupt_config(broken):
    (broken / "config.json").write_text("{not json")
    expect_error(lambda: read_hf(broken), "config.json", "not valid JSON")


def test_no_weight_files(broken):
    (broken / "model.safetensors").unlink()
    expect_error(lambda: read_hf(broken), broken, "no weight files")


def test_index_names_missing_shard(tmp_path):
    make_hf_llama(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    expect_error(lambda: read_hf(tmp_path), "index.json", shard.name, "does not exist")


def test_truncated_safetensors(broken):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    expect_error(lambda: read_hf(broken), path, "corrupt safetensors")


def test_bogus_header_length(broken):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    expect_error(lambda: read_hf(broken), path, "header length")


def test_tiny_safetensors(broken):
    path = broken / "model.safetensors"
    path.write_bytes(b"\x01\x02")
    expect_error(lambda: read_hf(broken), path, "truncated")


def test_shape_contradicts_config(broken):
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 128
    (broken / "config.json").write_text(json.dumps(config))
    expect_error(lambda: read_hf(broken), "model.safetensors", "mlp.", "but the config implies", "128]")


def test_missing_tensor(broken):
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, broken / "model.safetensors")
    expect_error(lambda: read_hf(broken), broken, "missing", "layers.1.feed_forward.w3.weight")


def test_unexpected_tensor(broken):
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(weights, broken / "model.safetensors")
    expect_error(lambda: read_hf(broken), "model.safetensors", "unexpected tensor model.layers.0.self_attn.q_proj.bias")


def test_bad_dtype(base):
    expect_error(lambda: read_hf(base[0], dtype=torch.int8), "dtype")
