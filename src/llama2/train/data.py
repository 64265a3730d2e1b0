"""Training data: token files on disk, chat loss masks, packed or padded rows, a resumable order.

Corpora are tokenized once into a prepared folder of memory-mapped files:

    index.json      what the folder holds, where preparation got to, what made it
    tokens.bin      every document's ids back to back (uint16, or uint32 for big vocabularies)
    mask.bin        uint8 per token: 1 where the token is a training target (chat data only)
    documents.bin   int64 start offset of each document

Preparation commits its progress every few megabytes, so an interrupted run picks up
where it stopped. `llama2.train.packing` turns the documents into rows for the model.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..chat import ChatFormat, JinjaChatFormat, Llama2ChatFormat
from ..errors import Llama2Error
from ..tokenizer import Tokenizer

INDEX_FILE = "index.json"
TOKENS_FILE = "tokens.bin"
MASK_FILE = "mask.bin"
DOCUMENTS_FILE = "documents.bin"
FORMAT_NAME = "llama2-tokens"
FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
COMMIT_BYTES = 4 << 20  # commit progress after this much input
TEXT_CHUNK_BYTES = 1 << 20  # plain text files are tokenized in chunks of about this size


# ---------------------------------------------------------------------------- sources


def find_source_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The data files named by `paths`: files as given, folders expanded to their text/JSONL files, sorted.

    Raises:
        Llama2Error: a path is missing, or a folder holds no data file.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise Llama2Error(f"{path}: no .txt, .md or .jsonl files in this folder")
            files.extend(found)
        else:
            raise Llama2Error(f"{path}: no such data file or folder")
    return files


def is_prepared(paths: Sequence[str | os.PathLike]) -> bool:
    """Whether `paths` is a single folder prepared before (it holds `index.json`)."""
    return len(paths) == 1 and (Path(paths[0]) / INDEX_FILE).is_file()


def _json_object(line: bytes, where: str) -> dict | list:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise Llama2Error(f"{where}: not valid JSON ({error})") from None
    return value


def _text_field(value, where: str) -> str:
    if not isinstance(value, dict) or not isinstance(value.get("text"), str):
        raise Llama2Error(f"{where}: a pretraining JSONL line must be an object with a string 'text' field")
    return value["text"]


def _dialog_field(value, where: str) -> list[dict]:
    messages = value.get("messages") if isinstance(value, dict) else value
    valid = isinstance(messages, list) and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        for m in messages
    )
    if not valid or not messages:
        raise Llama2Error(
            f'{where}: a chat JSONL line must be {{"messages": [{{"role": system|user|assistant, '
            '"content": ...}, ...]}'
        )
    return messages


# ---------------------------------------------------------------------------- chat loss masks


def encode_chat_example(chat_format: ChatFormat, dialog: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a finished dialog and which of them are training targets.

    The ids are the format's encoding of the dialog up to its last assistant message.
    Targets are each assistant answer's tokens up to and including the end-of-turn (or
    EOS) token that closes it; system and user turns and the format's own markup are not,
    nor answers marked ``"train": false`` (Ghost Attention trains on the last turn only).
    An answer starts where `chat_format.encode_dialog_prompt` of the dialog before it
    ends, so training sees exactly the prompt the model gets when asked to answer.

    Args:
        chat_format: the model's chat format.
        dialog: messages with roles system/user/assistant.

    Returns:
        (ids, mask) of the same length.

    Raises:
        Llama2Error: the dialog has no assistant message or does not fit the format.
    """
    answers = [i for i, message in enumerate(dialog) if message["role"] == "assistant"]
    if not answers:
        raise Llama2Error("the dialog has no assistant message to train on")
    ids = encode_finished_dialog(chat_format, dialog[: answers[-1] + 1])
    mask = [False] * len(ids)
    for i in (i for i in answers if dialog[i].get("train", True) is not False):
        start = _common_prefix_len(chat_format.encode_dialog_prompt(dialog[:i]), ids)
        end = _common_prefix_len(encode_finished_dialog(chat_format, dialog[: i + 1]), ids)
        end = _end_after_stop(ids, start, end, chat_format.stop_ids)
        mask[start:end] = [True] * (end - start)
    return ids, mask


def encode_finished_dialog(chat_format: ChatFormat, dialog: list[dict]) -> list[int]:
    """The format's ids for a dialog that ends with an assistant answer (no generation prompt)."""
    if isinstance(chat_format, Llama2ChatFormat):
        # Meta's format encodes every finished exchange on its own: encode the dialog
        # followed by a probe question, then drop the probe's ids.
        probe = [{"role": "user", "content": "?"}]
        ids = chat_format.encode_dialog_prompt([*dialog, *probe])
        tail = chat_format.encode_dialog_prompt(probe)
        return ids[: len(ids) - len(tail)]
    if isinstance(chat_format, JinjaChatFormat):
        finished = copy.copy(chat_format)
        finished.add_generation_prompt = False
        return finished.encode_dialog_prompt(dialog)
    eos = chat_format.tokenizer.eos_id
    return chat_format.encode_dialog_prompt(dialog) + ([eos] if eos >= 0 else [])


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _end_after_stop(ids: Sequence[int], start: int, end: int, stop_ids: frozenset[int]) -> int:
    """`end`, or just past the first stop token in ids[start:end] (template text after it is not trained)."""
    for i in range(start, end):
        if ids[i] in stop_ids:
            return i + 1
    return end


# ---------------------------------------------------------------------------- writing


@dataclass
class _Progress:
    """Where preparation got to: the next file and byte offset to read, and what is written."""

    file: int = 0
    offset: int = 0
    tokens: int = 0
    documents: int = 0
    open_document: bool = False


class TokenFileWriter:
    """Appends documents to a prepared folder's files and commits progress atomically.

    A commit flushes the files, then replaces `index.json`; reopening an unfinished folder
    truncates the files to the last commit, so anything written after it is redone.
    """

    def __init__(self, folder: Path, fingerprint: dict, vocab_size: int, with_mask: bool, resume: bool = True):
        self.folder = folder
        self.fingerprint = fingerprint
        self.dtype = np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
        self.with_mask = with_mask
        folder.mkdir(parents=True, exist_ok=True)
        index = _read_index(folder) if resume else None
        if index is not None and index.get("fingerprint") == fingerprint:
            self.progress = _Progress(**index["progress"])
        else:
            self.progress = _Progress()
        self._files = {name: self._open(name) for name in self._file_sizes()}

    def _file_sizes(self) -> dict[str, int]:
        sizes = {TOKENS_FILE: self.progress.tokens * self.dtype.itemsize, DOCUMENTS_FILE: self.progress.documents * 8}
        if self.with_mask:
            sizes[MASK_FILE] = self.progress.tokens
        return sizes

    def _open(self, name: str):
        path = self.folder / name
        size = self._file_sizes()[name]
        file = path.open("r+b" if path.exists() else "w+b")
        file.truncate(size)
        file.seek(size)
        return file

    def add(self, ids: Sequence[int], mask: Sequence[bool] | None = None, new_document: bool = True) -> None:
        """Append ids (a new document, or the continuation of the open one)."""
        if new_document:
            self._files[DOCUMENTS_FILE].write(np.asarray([self.progress.tokens], dtype=np.int64).tobytes())
            self.progress.documents += 1
        self._files[TOKENS_FILE].write(np.asarray(ids, dtype=self.dtype).tobytes())
        if self.with_mask:
            self._files[MASK_FILE].write(np.asarray(mask, dtype=np.uint8).tobytes())
        self.progress.tokens += len(ids)

    def commit(self, file: int, offset: int, open_document: bool = False, complete: bool = False) -> None:
        """Make everything added so far durable, recording that input resumes at (file, offset)."""
        for handle in self._files.values():
            handle.flush()
            os.fsync(handle.fileno())
        self.progress.file, self.progress.offset, self.progress.open_document = file, offset, open_document
        index = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "dtype": self.dtype.name,
            "has_mask": self.with_mask,
            "num_tokens": self.progress.tokens,
            "num_documents": self.progress.documents,
            "complete": complete,
            "fingerprint": self.fingerprint,
            "progress": vars(self.progress),
        }
        write_json_atomic(self.folder / INDEX_FILE, index)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()


def write_json_atomic(path: Path, value) -> None:
    """Write JSON to a temporary sibling, fsync it, and rename it onto `path`."""
    temp = path.with_name(f".{path.name}.tmp")
    with temp.open("w", encoding="utf-8") as file:
        json.dump(value, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


def _read_index(folder: Path) -> dict | None:
    path = folder / INDEX_FILE
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise Llama2Error(f"{path}: unreadable index of prepared data ({error})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise Llama2Error(f"{path}: not an index of prepared token data")
    return index


def data_fingerprint(files: Sequence[Path], tokenizer: Tokenizer, kind: str, chat_format: ChatFormat | None) -> dict:
    """What a prepared folder was made from: the files (size, mtime), the tokenizer, the data kind."""
    return {
        "kind": kind,
        "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "tokenizer": [type(tokenizer).__name__, tokenizer.n_words, tokenizer.bos_id, tokenizer.eos_id],
        "chat_format": chat_format.name if chat_format is not None else None,
    }


def prepare_data(
    paths: Sequence[str | os.PathLike],
    folder: str | os.PathLike,
    tokenizer: Tokenizer,
    chat_format: ChatFormat | None = None,
    show_progress: bool = True,
) -> TokenDataset:
    """Tokenize text or chat files into `folder` (resuming an unfinished preparation).

    Pretraining data (no `chat_format`): each plain text file is one document, each JSONL
    line's "text" another; documents get BOS (when the tokenizer adds one) and EOS.
    Chat data: each JSONL line is {"messages": [...]}, encoded by `encode_chat_example`.

    Args:
        paths: data files or folders.
        folder: where the prepared files go.
        tokenizer: the model's tokenizer.
        chat_format: the chat format, for chat data; None for pretraining text.
        show_progress: show a progress bar over the input bytes.

    Returns:
        The prepared dataset.

    Raises:
        Llama2Error: missing files, bad lines, a folder prepared from other data.
    """
    from tqdm import tqdm

    files = find_source_files(paths)
    kind = "chat" if chat_format is not None else "text"
    folder = Path(folder)
    fingerprint = data_fingerprint(files, tokenizer, kind, chat_format)
    index = _read_index(folder)
    if index is not None and index["complete"]:
        if index["fingerprint"] == fingerprint:
            return TokenDataset(folder)
        raise Llama2Error(
            f"{folder}: holds data prepared from other files or another tokenizer; use a new output folder"
        )
    writer = TokenFileWriter(folder, fingerprint, tokenizer.n_words, with_mask=chat_format is not None)
    sizes = [p.stat().st_size for p in files]
    done = sum(sizes[: writer.progress.file]) + writer.progress.offset
    with tqdm(
        total=sum(sizes), initial=done, unit="B", unit_scale=True, desc="tokenizing", disable=not show_progress
    ) as bar:
        try:
            for file_index in range(writer.progress.file, len(files)):
                start = writer.progress.offset if file_index == writer.progress.file else 0
                _prepare_file(writer, files[file_index], file_index, start, tokenizer, chat_format, bar)
            writer.commit(len(files), 0, complete=True)
        finally:
            writer.close()
    dataset = TokenDataset(folder)
    if dataset.num_documents == 0:
        raise Llama2Error(f"{', '.join(map(str, paths))}: no documents to train on")
    return dataset


def write_token_dataset(
    folder: str | os.PathLike,
    documents: Iterable[tuple[Sequence[int], Sequence[bool] | None]],
    vocab_size: int,
    with_mask: bool = False,
) -> TokenDataset:
    """Write already tokenized documents (ids, target mask or None) as a prepared folder."""
    writer = TokenFileWriter(Path(folder), {"kind": "documents"}, vocab_size, with_mask, resume=False)
    try:
        for ids, mask in documents:
            writer.add(ids, mask if with_mask else None)
        writer.commit(0, 0, complete=True)
    finally:
        writer.close()
    return TokenDataset(folder)


def _prepare_file(writer, path, file_index, start, tokenizer, chat_format, bar) -> None:
    if path.suffix in JSONL_SUFFIXES:
        _prepare_jsonl(writer, path, file_index, start, tokenizer, chat_format, bar)
    elif chat_format is not None:
        raise Llama2Error(f'{path}: chat data must be JSONL (one {{"messages": [...]}} per line)')
    else:
        _prepare_text(writer, path, file_index, start, tokenizer, bar)


def _prepare_jsonl(writer, path, file_index, start, tokenizer, chat_format, bar) -> None:
    """One document per non-empty line; commit every `COMMIT_BYTES` of input."""
    last_commit = start
    with path.open("rb") as file:
        file.seek(start)
        offset = start
        for line in iter(file.readline, b""):
            where = f"{path}:byte {offset}"
            offset += len(line)
            bar.update(len(line))
            if line.strip():
                _add_json_document(writer, _json_object(line, where), where, tokenizer, chat_format)
            if offset - last_commit >= COMMIT_BYTES:
                writer.commit(file_index, offset)
                last_commit = offset
    writer.commit(file_index + 1, 0)


def _add_json_document(writer, value, where, tokenizer, chat_format) -> None:
    if chat_format is None:
        writer.add(tokenizer.encode(_text_field(value, where), bos=tokenizer.add_bos, eos=True))
        return
    try:
        ids, mask = encode_chat_example(chat_format, _dialog_field(value, where))
    except Llama2Error as error:
        raise Llama2Error(f"{where}: {error}") from None
    writer.add(ids, mask)


def _prepare_text(writer, path, file_index, start, tokenizer, bar) -> None:
    """A whole text file is one document, tokenized in line-aligned chunks with a commit after each."""
    size = path.stat().st_size
    with path.open("rb") as file:
        file.seek(start)
        offset = start
        while offset < size:
            chunk = file.read(TEXT_CHUNK_BYTES) + file.readline()
            first, offset = offset == 0, offset + len(chunk)
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError as error:
                raise Llama2Error(f"{path}: not UTF-8 text ({error})") from None
            ids = tokenizer.encode(text, bos=first and tokenizer.add_bos, eos=offset >= size)
            writer.add(ids, new_document=first)
            bar.update(len(chunk))
            writer.commit(file_index, offset, open_document=offset < size)
    writer.commit(file_index + 1, 0)


# ---------------------------------------------------------------------------- reading


class TokenDataset:
    """A prepared folder, memory-mapped: documents of token ids with optional target masks."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = _read_index(self.folder)
        if index is None:
            raise Llama2Error(f"{self.folder}: no {INDEX_FILE}; not a prepared data folder")
        if not index["complete"]:
            raise Llama2Error(f"{self.folder}: data preparation did not finish; run the training command again")
        self.index = index
        self.num_tokens = index["num_tokens"]
        self.num_documents = index["num_documents"]
        self.tokens = _memmap(self.folder / TOKENS_FILE, np.dtype(index["dtype"]), self.num_tokens)
        self.mask = _memmap(self.folder / MASK_FILE, np.dtype(np.uint8), self.num_tokens) if index["has_mask"] else None
        starts = _memmap(self.folder / DOCUMENTS_FILE, np.dtype(np.int64), self.num_documents)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.lengths = np.diff(np.append(self.starts, self.num_tokens))

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Ids of document `i` and its target mask (None: every token is a target)."""
        start, end = self.starts[i], self.starts[i] + self.lengths[i]
        return self.tokens[start:end], None if self.mask is None else self.mask[start:end]


def _memmap(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    if not path.is_file() or path.stat().st_size < count * dtype.itemsize:
        raise Llama2Error(f"{path}: missing or shorter than its index says")
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))
