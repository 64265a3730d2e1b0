"""Training data: chat loss masks, token files, packing and padding, against hand-built examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llama2.chat import JinjaChatFormat, Llama2ChatFormat, resolve_chat_format
from llama2.config import ModelArgs
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer, llama2_tokenizer_path
from llama2.train import data as data_module
from llama2.train.data import TokenDataset, encode_chat_example, prepare_data, write_token_dataset
from llama2.train.packing import IGNORE_INDEX, BatchPlan, EpochSampler, PackedRows, PaddedRows, collate

from helpers import expect_error
from train_helpers import one_thread  # noqa: F401 (autouse fixture)

DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "ok"},
]


@pytest.fixture(scope="module")
def llama_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(llama2_tokenizer_path())


def pieces(tokenizer, ids):
    return [tokenizer.id_to_piece(i) for i in ids]


# ---------------------------------------------------------------------------- chat masks


def test_llama2_chat_mask_marks_answers_and_their_eos(llama_tokenizer):
    ids, mask = encode_chat_example(Llama2ChatFormat(llama_tokenizer), DIALOG)
    # Meta's format, written out by hand: each exchange is "<s>[INST] ... [/INST] answer </s>".
    first = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhi [/INST] hello there "
    expected = llama_tokenizer.encode(first, bos=True, eos=True) + llama_tokenizer.encode(
        "[INST] bye [/INST] ok ", bos=True, eos=True
    )
    assert ids == expected
    trained = [p for p, m in zip(pieces(llama_tokenizer, ids), mask) if m]
    assert trained == ["▁hello", "▁there", "▁", "</s>", "▁ok", "▁", "</s>"]
    # Every answer starts exactly where the inference-time prompt for it ends.
    prompt = Llama2ChatFormat(llama_tokenizer).encode_dialog_prompt(DIALOG[:4])
    assert ids[: len(prompt)] == prompt and mask[len(prompt) - 1] is False and mask[len(prompt)] is True


@pytest.mark.model
def test_chatml_template_mask_ends_at_end_of_turn(default_model_path):
    tokenizer = Tokenizer.from_file(default_model_path)
    fmt = resolve_chat_format(tokenizer, tokenizer.chat_template)
    assert isinstance(fmt, JinjaChatFormat)
    ids, mask = encode_chat_example(fmt, DIALOG[1:])
    text = "".join(
        [
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
            "hello there<|im_end|>",
            "\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n",
            "ok<|im_end|>",
            "\n",
        ]
    )
    assert ids == tokenizer.encode_with_special(text)
    spans = _true_spans(mask)
    assert [tokenizer.decode(ids[a:b]) for a, b in spans] == ["hello there", "ok"]
    assert [ids[b - 1] for _, b in spans] == [tokenizer.eos_id, tokenizer.eos_id]  # <|im_end|> is trained
    assert not mask[-1]  # the newline after the last <|im_end|> is template glue


def _true_spans(mask):
    spans, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_dialog_without_answer_is_an_error(llama_tokenizer):
    expect_error(lambda: encode_chat_example(Llama2ChatFormat(llama_tokenizer), DIALOG[:2]), "no assistant message")


# ---------------------------------------------------------------------------- token files


def test_prepare_text_and_jsonl(tmp_path, llama_tokenizer):
    (tmp_path / "a.txt").write_text("one two\nthree\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "four"}) + "\n\n" + json.dumps({"text": "five six"}) + "\n")
    dataset = prepare_data(
        [tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "out", llama_tokenizer, show_progress=False
    )
    docs = [dataset.document(i)[0].tolist() for i in range(dataset.num_documents)]
    expected = [llama_tokenizer.encode(t, bos=True, eos=True) for t in ("one two\nthree\n", "four", "five six")]
    assert docs == expected
    assert dataset.tokens.dtype == np.uint16 and dataset.mask is None


def test_prepare_chat_data_keeps_masks(tmp_path, llama_tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": DIALOG}) + "\n")
    fmt = Llama2ChatFormat(llama_tokenizer)
    dataset = prepare_data([path], tmp_path / "out", llama_tokenizer, fmt, show_progress=False)
    ids, mask = dataset.document(0)
    assert (ids.tolist(), mask.astype(bool).tolist()) == encode_chat_example(fmt, DIALOG)


def test_bad_lines_are_one_line_errors(tmp_path, llama_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": 1}\n')
    expect_error(
        lambda: prepare_data([path], tmp_path / "o1", llama_tokenizer, show_progress=False), "bad.jsonl", "'text'"
    )
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    fmt = Llama2ChatFormat(llama_tokenizer)
    expect_error(
        lambda: prepare_data([path], tmp_path / "o2", llama_tokenizer, fmt, show_progress=False), "no assistant"
    )
    expect_error(lambda: prepare_data([tmp_path / "missing"], tmp_path / "o3", llama_tokenizer), "no such data file")


def test_interrupted_preparation_resumes_to_identical_files(tmp_path, llama_tokenizer, monkeypatch):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(300)))
    reference = prepare_data([corpus], tmp_path / "reference", llama_tokenizer, show_progress=False)

    monkeypatch.setattr(data_module, "COMMIT_BYTES", 4096)
    calls = {"n": 0}
    real_encode = llama_tokenizer.encode

    def failing_encode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 150:
            raise KeyboardInterrupt
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(llama_tokenizer, "encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        prepare_data([corpus], tmp_path / "resumed", llama_tokenizer, show_progress=False)
    index = json.loads((tmp_path / "resumed" / "index.json").read_text())
    assert not index["complete"] and 0 < index["progress"]["documents"] < 150
    monkeypatch.setattr(llama_tokenizer, "encode", real_encode)
    resumed = prepare_data([corpus], tmp_path / "resumed", llama_tokenizer, show_progress=False)
    assert resumed.num_documents == 300
    assert np.array_equal(resumed.tokens, reference.tokens) and np.array_equal(resumed.starts, reference.starts)


# ---------------------------------------------------------------------------- packing


@pytest.fixture
def three_documents(tmp_path) -> TokenDataset:
    documents = [
        ([10, 11, 12], [0, 1, 1]),
        ([20, 21], [0, 1]),
        ([30, 31, 32, 33], [0, 0, 1, 1]),
    ]
    return write_token_dataset(tmp_path / "docs", documents, vocab_size=100, with_mask=True)


def as_lists(row):
    return [row.inputs.tolist(), row.labels.tolist(), row.positions.tolist(), row.document_ids.tolist()]


def test_split_packing_hand_built(three_documents):
    rows = PackedRows(three_documents, seq_len=4, split_documents=True)
    assert len(rows) == 1  # 2 + 1 + 3 = 6 (input, label) pairs: one full row of 4, the rest dropped
    x = -100
    assert as_lists(rows[0]) == [
        [10, 11, 20, 30],
        [11, 12, 21, x],  # 30 -> 31 is not a target (mask 0)
        [0, 1, 0, 0],
        [0, 0, 1, 2],
    ]
    rows = PackedRows(three_documents, seq_len=3, split_documents=True)
    assert as_lists(rows[1]) == [[30, 31, 32], [x, 32, 33], [0, 1, 2], [0, 0, 0]]


def test_whole_packing_and_padding_hand_built(three_documents):
    x = -100
    rows = PackedRows(three_documents, seq_len=4, split_documents=False)
    assert len(rows) == 2
    assert as_lists(rows[0]) == [[10, 11, 20, 0], [11, 12, 21, x], [0, 1, 0, 3], [0, 0, 1, 1]]
    assert as_lists(rows[1]) == [[30, 31, 32, 0], [x, 32, 33, x], [0, 1, 2, 3], [0, 0, 0, 0]]
    padded = PaddedRows(three_documents, seq_len=2)
    assert [as_lists(padded[i])[:2] for i in range(3)] == [
        [[10, 11], [11, 12]],
        [[20, 0], [21, x]],
        [[30, 31], [x, 32]],  # truncated to two pairs
    ]


def test_collate_trims_padding_and_uses_plain_causal_attention_when_possible(three_documents):
    padded = PaddedRows(three_documents, seq_len=8)
    batch = collate([padded[1], padded[0]])
    assert batch.inputs.tolist() == [[20, 0], [10, 11]]
    assert batch.positions is None and batch.document_ids is None
    packed = collate([PackedRows(three_documents, 4, split_documents=False)[0]])
    assert packed.document_ids.tolist() == [[0, 0, 1]] and packed.positions.tolist() == [[0, 1, 0]]
    assert packed.num_targets == 3


def test_packed_attention_equals_separate_sequences():
    """Logits of a packed row equal each example's logits computed on its own."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)).eval()
    examples = [torch.randint(50, (n,)) for n in (5, 3, 6)]
    tokens = torch.cat(examples)[None]
    positions = torch.cat([torch.arange(len(e)) for e in examples])[None]
    document_ids = torch.cat([torch.full((len(e),), k) for k, e in enumerate(examples)])[None]
    with torch.no_grad():
        packed = model(tokens, positions, document_ids=document_ids)[0]
        separate = torch.cat([model(e[None])[0] for e in examples])
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=12),
    seq_len=st.integers(1, 9),
    split=st.booleans(),
)
def test_packing_properties(tmp_path_factory, lengths, seq_len, split):
    """Every target appears once, in order, within its own document; rows never overflow."""
    folder = tmp_path_factory.mktemp("p")
    docs = [(list(range(100 * d, 100 * d + n)), None) for d, n in enumerate(lengths)]
    rows = PackedRows(write_token_dataset(folder, docs, vocab_size=2000), seq_len, split_documents=split)
    seen = []
    for i in range(len(rows)):
        row = rows[i]
        assert row.length <= seq_len and (not split or row.length == seq_len)
        valid = row.labels != IGNORE_INDEX
        assert np.all(row.labels[valid] == row.inputs[valid] + 1)  # next token of the same document
        seen += row.labels[valid].tolist()
    every_target = [t for ids, _ in docs for t in ids[1:]]
    if split:
        assert seen == every_target[: len(seen)] and len(every_target) - len(seen) < seq_len
    else:
        assert seen == [t for ids, _ in docs for t in ids[1 : seq_len + 1]]


# ---------------------------------------------------------------------------- order


def test_batch_plan_splits_the_global_batch_across_processes():
    single = [list(r) for r in BatchPlan(8, 1, 0, 8).micro_batches(24)]
    assert single == [list(range(24, 32))]
    shards = [list(r) for rank in range(2) for r in BatchPlan(8, 2, rank, 2).micro_batches(24)]
    assert sorted(sum(shards, [])) == single[0] and len(shards) == 4
    expect_error(lambda: BatchPlan(6, 4, 0, 1), "multiple of processes")


def test_sampler_is_a_function_of_the_sample_number():
    a, b = EpochSampler(10, seed=3), EpochSampler(10, seed=3)
    first = [a.row(k) for k in range(25)]
    assert sorted(first[:10]) == list(range(10)) and first[:10] != first[10:20]
    assert [b.row(k) for k in reversed(range(25))] == first[::-1]
    assert [EpochSampler(4, 0, shuffle=False).row(k) for k in range(6)] == [0, 1, 2, 3, 0, 1]
