"""Fuzzing the GGUF and safetensors readers with mutated valid files.

Each example damages a small valid file (truncation, byte flips, 64-bit counts and
lengths overwritten with extreme values, bytes inserted or deleted in the header) and
reads it completely. The reader must return a checkpoint or raise our one-line
`Llama2Error` naming the file: no other exception, no hang (a timer interrupts one),
and no allocation out of proportion to the file (`tracemalloc` sees Python, numpy and
our tensor buffers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llama2.errors import Llama2Error
from llama2.weights import read_gguf, read_hf, write_gguf, write_hf

from convert_helpers import random_state_dict, tiny_args

EXAMPLES = int(os.environ.get("LLAMA2_FUZZ_EXAMPLES", "400"))  # more for a longer local campaign
SECONDS_PER_EXAMPLE = 10
MEMORY_PER_FILE_BYTE = 16  # parsed header structures cost a bounded multiple of their bytes
MEMORY_SLACK = 1 << 20
EXTREMES = [0, 1, 7, 8, 255, 2**31 - 1, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1]

ARGS = tiny_args(dim=32, n_heads=8, n_kv_heads=4, hidden_dim=64, vocab_size=96)
VOCAB = {
    "tokenizer.ggml.model": "llama",
    "tokenizer.ggml.tokens": [f"t{i}" for i in range(96)],
    "tokenizer.ggml.scores": [float(-i) for i in range(96)],
    "tokenizer.ggml.token_type": [1] * 96,
    "tokenizer.ggml.bos_token_id": 1,
}


class Target(NamedTuple):
    """Where damaged bytes go, the valid bytes, where their header ends, and what reading means."""

    file: Path
    content: bytes
    header_end: int
    source: Path
    read: Callable[[Path], object]


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> dict[str, Target]:
    import gguf

    root = tmp_path_factory.mktemp("fuzz")
    state_dict = random_state_dict(ARGS)
    gguf_path = write_gguf(ARGS, state_dict, root / "model.gguf", tensor_type="q8_0", tokenizer_metadata=VOCAB)
    hf_folder = write_hf(ARGS, state_dict, root / "hf")
    safetensors = (hf_folder / "model.safetensors").read_bytes()
    return {
        "gguf": Target(
            root / "damaged.gguf",
            gguf_path.read_bytes(),
            gguf.GGUFReader(gguf_path).data_offset,
            root / "damaged.gguf",
            read_gguf,
        ),
        "safetensors": Target(
            hf_folder / "model.safetensors",
            safetensors,
            8 + int.from_bytes(safetensors[:8], "little"),
            hf_folder,
            read_hf,
        ),
    }


@st.composite
def damage(draw, data: bytes, header_end: int) -> bytes:
    """`data` with one to four mutations, mostly inside the header."""
    content = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "u64", "insert", "delete"]))
        at = draw(st.integers(0, max(0, min(header_end, len(content)) - 1)))
        if kind == "truncate":
            del content[draw(st.integers(0, len(content))) :]
        elif kind == "flip":
            content[at : at + 1] = bytes([draw(st.integers(0, 255))])
        elif kind == "u64":
            value = draw(st.sampled_from(EXTREMES) | st.integers(0, 2**64 - 1))
            content[at : at + 8] = value.to_bytes(8, "little")
        elif kind == "insert":
            content[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del content[at : at + draw(st.integers(1, 16))]
    return bytes(content)


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise TimeoutError in the block after `seconds` (where the platform has SIGALRM)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"reading took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read_damaged(read, path: Path, size: int) -> None:
    """Read with the guards; only Llama2Error naming `path` may escape."""
    tracemalloc.start()
    try:
        with time_limit(SECONDS_PER_EXAMPLE), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # damaged values may be NaN: a warning, not an error
            read()
        event("read")
    except Llama2Error as error:
        message = str(error)
        assert "\n" not in message and str(path) in message, message
        event("Llama2Error")
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= MEMORY_PER_FILE_BYTE * size + MEMORY_SLACK, f"{peak} bytes traced for a {size}-byte file"


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
@FUZZ
@given(data=st.data())
def test_reader_survives_damage(targets, fmt, data):
    target = targets[fmt]
    damaged = data.draw(damage(target.content, target.header_end))
    target.file.write_bytes(damaged)
    read_damaged(lambda: target.read(target.source), target.source, len(damaged))


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="no SIGALRM")
def test_time_limit_interrupts():
    with pytest.raises(TimeoutError), time_limit(1):
        while True:
            pass
