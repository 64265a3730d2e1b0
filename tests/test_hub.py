"""`llama2 pull ORG/NAME`: file selection and resolution, against a local folder standing in for the Hub."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llama2.cli import main
from llama2.weights import hub, load_checkpoint, write_gguf, write_hf, write_meta

from convert_helpers import random_state_dict, tiny_args
from helpers import expect_error

pytestmark = pytest.mark.filterwarnings("ignore::llama2.errors.Llama2Warning")


@pytest.fixture()
def fake_hub(monkeypatch, tmp_path) -> dict[str, Path]:
    """Repo id -> local folder; `hub` lists and downloads from these folders, recording each download."""
    monkeypatch.setenv("LLAMA2_HOME", str(tmp_path / "home"))
    repos: dict[str, Path] = {}
    downloads: list[list[str]] = []

    def list_files(repo_id: str, revision: str | None) -> list[str]:
        root = repos[repo_id]
        return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())

    def download(repo_id: str, revision: str | None, files: list[str], folder: Path) -> None:
        downloads.append(files)
        for name in files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repos[repo_id] / name, folder / name)

    monkeypatch.setattr(hub, "_list_files", list_files)
    monkeypatch.setattr(hub, "_download", download)
    repos["downloads"] = downloads  # type: ignore[assignment]
    return repos


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    args = tiny_args()
    return args, random_state_dict(args), tmp_path_factory.mktemp("models")


def test_pull_hf_repo_takes_safetensors_and_configs_only(fake_hub, model, capsys):
    args, state_dict, root = model
    repo = write_hf(args, state_dict, root / "hf", max_shard_bytes=60_000)
    (repo / "README.md").write_text("card")
    (repo / "pytorch_model.bin").write_bytes(b"old weights")
    (repo / "original").mkdir()
    (repo / "original" / "consolidated.00.pth").write_bytes(b"meta weights")
    fake_hub["meta-llama/Tiny-hf"] = repo

    assert main(["pull", "meta-llama/Tiny-hf"]) == 0

    folder = Path(capsys.readouterr().out.strip())
    assert folder == hub.local_folder("meta-llama/Tiny-hf")
    (files,) = fake_hub["downloads"]
    assert "README.md" not in files and "pytorch_model.bin" not in files and "original/consolidated.00.pth" not in files
    assert "config.json" in files and "model.safetensors.index.json" in files
    checkpoint = load_checkpoint("meta-llama/Tiny-hf")  # the repo id now works as a source
    assert checkpoint.format == "hf" and checkpoint.source == str(folder)


def test_pull_meta_repo(fake_hub, model):
    args, state_dict, root = model
    repo = write_meta(args, state_dict, root / "meta", 2)
    (repo / "tokenizer.model").write_bytes(b"spm")
    fake_hub["meta-llama/Tiny"] = repo

    folder = hub.pull("meta-llama/Tiny")

    assert sorted(fake_hub["downloads"][0]) == [
        "consolidated.00.pth",
        "consolidated.01.pth",
        "params.json",
        "tokenizer.model",
    ]
    assert load_checkpoint("meta-llama/Tiny").args.n_kv_heads == 8 and folder.is_dir()


def test_pull_one_gguf_file(fake_hub, model):
    args, state_dict, root = model
    (root / "gguf").mkdir(exist_ok=True)
    for kind in ("q8_0", "q4_0"):
        write_gguf(args, state_dict, root / "gguf" / f"tiny.{kind}.gguf", tensor_type=kind)
    fake_hub["someone/Tiny-GGUF"] = root / "gguf"

    expect_error(lambda: hub.pull("someone/Tiny-GGUF"), "someone/Tiny-GGUF", "GGUF files only", "--file tiny.q4_0.gguf")
    expect_error(lambda: hub.pull("someone/Tiny-GGUF", filename="nope.gguf"), "has no file nope.gguf")
    path = hub.pull("someone/Tiny-GGUF", filename="tiny.q4_0.gguf")

    assert path.name == "tiny.q4_0.gguf"
    assert set(load_checkpoint("someone/Tiny-GGUF").tensor_types.values()) == {"Q4_0", "Q8_0", "F32"}


def test_repo_without_weights(fake_hub, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("x")
    fake_hub["org/empty"] = tmp_path / "empty"
    expect_error(lambda: hub.pull("org/empty"), "org/empty", "no safetensors, PyTorch or Meta weights")


def test_not_pulled_and_bad_names(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LLAMA2_HOME", str(tmp_path))
    expect_error(lambda: load_checkpoint("meta-llama/Llama-2-7b-chat-hf"), "llama2 pull meta-llama/Llama-2-7b-chat-hf")
    expect_error(lambda: hub.pull("not a repo"), "not a Hugging Face repo id")
    assert main(["pull", "no-such-model"]) == 1
    assert "not a model name" in capsys.readouterr().err


def test_network_failure_is_one_line(monkeypatch, tmp_path):
    """The real huggingface_hub path, with the Hub unreachable (offline mode): no network needed."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("LLAMA2_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    expect_error(lambda: hub.pull("meta-llama/Llama-2-7b-chat-hf"), "meta-llama/Llama-2-7b-chat-hf: download failed")
