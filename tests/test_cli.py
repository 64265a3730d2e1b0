"""The `llama2` command: outputs, golden end-to-end agreement, and one-line errors."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama2.cli import main
from llama2.generation import Llama
from llama2.tokenizer import llama2_tokenizer_path

from helpers import make_hf_llama

META_HI_HELLO_BYE = [
    1,
    518,
    25580,
    29962,
    7251,
    518,
    29914,
    25580,
    29962,
    15043,
    29991,
    29871,
    2,
    1,
    518,
    25580,
    29962,
    491,
    29872,
    518,
    29914,
    25580,
    29962,
]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("llama2: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory) -> Path:
    """A random tiny HF Llama with Meta's 32000-token vocabulary and tokenizer, 64-token context."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_hf_llama(folder, gqa=True, vocab_size=32000)
    shutil.copy(llama2_tokenizer_path(), folder / "tokenizer.model")
    return folder


@pytest.mark.parametrize(
    ("preset", "shown"), [("llama2-7b", "6.74B"), ("llama2-13b", "13.0B"), ("llama2-70b-chat", "69.0B")]
)
def test_info_presets_parameter_counts(capsys, preset, shown):
    code, out, _ = run_cli(capsys, "info", preset)
    assert code == 0
    assert f"parameters       {shown}" in out


def test_info_70b_shows_gqa(capsys):
    _, out, _ = run_cli(capsys, "info", "llama2-70b")
    assert "64 (KV heads 8, head dim 128)" in out and "28672" in out


def test_tokenize_dialog_gives_metas_prompt_ids(capsys, tmp_path):
    dialog = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "bye"},
    ]
    (tmp_path / "d.json").write_text(json.dumps(dialog))
    code, out, _ = run_cli(
        capsys,
        "tokenize",
        "--tokenizer",
        str(llama2_tokenizer_path()),
        "--chat-format",
        "llama-2",
        "--dialog",
        str(tmp_path / "d.json"),
    )
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1]) == META_HI_HELLO_BYE


def test_tokenize_text_from_a_model_folder(capsys, tiny_llama_folder):
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_file=str(llama2_tokenizer_path()))
    code, out, _ = run_cli(capsys, "tokenize", "--model", str(tiny_llama_folder), "Hello  wörld 🦙")
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1]) == [1] + reference.encode("Hello  wörld 🦙")


def test_meta_folder_uses_llama2_chat_format(capsys, tiny_llama_folder, tmp_path):
    """A Llama SentencePiece model without a template gets Meta's chat format (golden ids)."""
    dialog = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "bye"},
    ]
    (tmp_path / "d.json").write_text(json.dumps(dialog))
    code, out, _ = run_cli(capsys, "tokenize", "--model", str(tiny_llama_folder), "--dialog", str(tmp_path / "d.json"))
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1]) == META_HI_HELLO_BYE


def test_generate_equals_python_api(capsys, tiny_llama_folder):
    llama = Llama.build(tiny_llama_folder, max_batch_size=1, device="cpu")
    expected = llama.text_completion(["Once upon"], temperature=0, max_gen_len=10)[0]["generation"]
    code, out, _ = run_cli(
        capsys, "generate", "--model", str(tiny_llama_folder), "-t", "0", "-n", "10", "--device", "cpu", "Once upon"
    )
    assert code == 0
    assert out == "Once upon" + expected + "\n"


def test_perplexity_equals_a_full_sequence_forward(capsys, tiny_llama_folder, tmp_path):
    """Cached windows scored by `llama2 perplexity` against the cache-free (training) forward."""
    text = "The quick brown fox jumps over the lazy dog. " * 6
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    llama = Llama.build(tiny_llama_folder, max_batch_size=1, device="cpu")
    tokens = llama.tokenizer.encode(text, bos=False, eos=False)
    llama.model.clear_caches()
    losses = []
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 16):
            window = torch.tensor([tokens[start : start + 16]])
            logits = llama.model(window)[0, :-1]
            losses.append(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="none"))
    expected = math.exp(torch.cat(losses).mean().item())
    code, out, _ = run_cli(
        capsys,
        "perplexity",
        "--model",
        str(tiny_llama_folder),
        "--device",
        "cpu",
        "--window",
        "16",
        str(tmp_path / "t.txt"),
    )
    assert code == 0
    assert abs(float(out.split()[1]) / expected - 1) < 1e-3, (out, expected)
    code, _, err = run_cli(capsys, "perplexity", "--model", str(tiny_llama_folder), str(tmp_path / "missing.txt"))
    assert code != 0 and "cannot read" in err and "Traceback" not in err


def test_chat_equals_python_api(capsys, tiny_llama_folder):
    llama = Llama.build(tiny_llama_folder, max_batch_size=1, device="cpu")
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    expected = llama.chat_completion([dialog], temperature=0, max_gen_len=8)[0]["generation"]["content"]
    code, out, _ = run_cli(
        capsys,
        "chat",
        "--model",
        str(tiny_llama_folder),
        "-t",
        "0",
        "-n",
        "8",
        "--device",
        "cpu",
        "--system",
        "Be brief.",
        "-p",
        "Hello",
    )
    assert code == 0
    assert out == expected + "\n"


# -- bad input: one clear line on stderr, non-zero exit, no traceback ------------------------------


def test_missing_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "chat", "--model", str(tmp_path / "nope"), "-p", "hi")
    assert_one_line_error(code, err, "no such file or directory")


def test_file_that_is_not_a_checkpoint(capsys, tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("just some text\n")
    code, _, err = run_cli(capsys, "chat", "--model", str(junk), "-p", "hi")
    assert_one_line_error(code, err, str(junk), "not a model name, GGUF file")


def test_truncated_safetensors(capsys, tiny_llama_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run_cli(capsys, "generate", "--model", str(broken), "hello")
    assert_one_line_error(code, err, "model.safetensors")


def test_shapes_contradicting_config(capsys, tiny_llama_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_folder, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = config["intermediate_size"] * 2
    (broken / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "generate", "--model", str(broken), "hello")
    assert_one_line_error(code, err, str(broken), "shape")


def test_prompt_longer_than_context(capsys, tiny_llama_folder):
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_llama_folder), "--device", "cpu", "word " * 100)
    assert_one_line_error(code, err, "context")


def test_bad_dialog_file(capsys, tmp_path):
    bad = tmp_path / "d.json"
    bad.write_text('{"role": "user"}')
    code, _, err = run_cli(capsys, "tokenize", "--tokenizer", str(llama2_tokenizer_path()), "--dialog", str(bad))
    assert_one_line_error(code, err, "dialog")


@pytest.mark.model
def test_truncated_gguf(capsys, default_model_path, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    with open(default_model_path, "rb") as src:
        truncated.write_bytes(src.read(4_000_000))
    code, _, err = run_cli(capsys, "chat", "--model", str(truncated), "-p", "hi")
    assert_one_line_error(code, err, str(truncated))


def test_console_script_reports_errors_without_traceback(tmp_path):
    """The real entry point, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "llama2.cli", "info", str(tmp_path / "missing.gguf")], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "missing.gguf: no such file or directory" in result.stderr


@pytest.mark.model
def test_default_model_chat_end_to_end(capsys, default_model_path):
    """Golden path: the same greedy answer from the Python API and the CLI on the default model."""
    llama = Llama.build(default_model_path, max_batch_size=1, device="cpu")
    dialog = [{"role": "user", "content": "Name a primary colour."}]
    expected = llama.chat_completion([dialog], temperature=0, max_gen_len=32)[0]["generation"]["content"]
    code, out, _ = run_cli(capsys, "chat", "-t", "0", "-n", "32", "--device", "cpu", "-p", "Name a primary colour.")
    assert code == 0
    assert out == expected + "\n"
    assert len(expected.split()) >= 2
