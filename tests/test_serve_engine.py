"""The continuous-batching engine, in process, on a tiny random model with Meta's tokenizer.

References are `Llama.generate` runs of one prompt at a time (its own prefill/decode
loop, batch of one), so batching, chunked prefill, slot reuse and per-row sampling
must not change a single token.
"""

import threading

import pytest
import torch

from llama2.errors import Llama2Error
from llama2.sampling import SamplingParams
from llama2.serve.engine import ContextLengthError, Engine, EngineClosedError, GenerationRequest, QueueFullError
from llama2.tokenizer import Tokenizer, llama2_tokenizer_path

from test_generation import make_llama

PROMPTS = ["Hi", "A much longer prompt than the first one, with commas", "Llamas", "The quick brown fox jumps"]


class Collector:
    """An engine sink that gathers each sequence's events and signals when all have finished."""

    def __init__(self, size: int, on_event=None):
        self.events = {i: [] for i in range(size)}
        self.done = threading.Event()
        self.on_event = on_event

    def __call__(self, event) -> None:
        if self.on_event:
            self.on_event(event)
        self.events[event.index].append(event)
        if all(evs and evs[-1].finish_reason for evs in self.events.values()):
            self.done.set()

    def wait(self, timeout: float = 60) -> "Collector":
        assert self.done.wait(timeout), "the engine did not finish in time"
        return self

    def text(self, index: int) -> str:
        return "".join(e.text for e in self.events[index])

    def last(self, index: int):
        return self.events[index][-1]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(llama2_tokenizer_path())


@pytest.fixture()
def engine(tokenizer):
    llama = make_llama(tokenizer, max_batch_size=3, max_seq_len=64)
    engine = Engine(llama, max_queue=8, prefill_chunk=5)
    engine.start()
    yield engine
    engine.stop()


def reference(engine: Engine, prompt: list[int], max_tokens: int, **options) -> str:
    """`Llama.generate` on the engine's model, one prompt, then decoded (run while the engine is idle)."""
    options.setdefault("temperature", 0.0)
    options.setdefault("stop_ids", frozenset())
    tokens, _ = engine.llama.generate([prompt], max_tokens, **options)
    return engine.tokenizer.decode(tokens[0])


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, bos=True, eos=False)


def test_batched_chunked_greedy_equals_single_runs(engine, tokenizer):
    """Seven prompts through three slots: chunked prefill, joins and leaves at token boundaries."""
    prompts = [encode(tokenizer, p) for p in PROMPTS + PROMPTS[:3]]
    lengths = [12, 20, 7, 15, 3, 9, 18]
    expected = [reference(engine, p, n) for p, n in zip(prompts, lengths, strict=True)]
    collector = Collector(len(prompts))
    requests = [GenerationRequest(p, n, index=i) for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))]
    engine.submit(requests[:4], collector)
    engine.submit(requests[4:], collector)
    collector.wait()
    for i, n in enumerate(lengths):
        assert collector.text(i) == expected[i]
        assert collector.last(i).finish_reason == "length"
        assert collector.last(i).completion_tokens == n


def test_seeded_sampling_is_per_request_and_matches_generate(engine, tokenizer):
    prompt = encode(tokenizer, PROMPTS[1])
    sampling = SamplingParams(temperature=0.9, top_p=0.8, top_k=50)
    expected = reference(engine, prompt, 16, temperature=0.9, top_p=0.8, top_k=50, seed=1234)
    collector = Collector(3)
    engine.submit(
        [
            GenerationRequest(encode(tokenizer, PROMPTS[0]), 16, sampling, seed=7, index=0),
            GenerationRequest(prompt, 16, sampling, seed=1234, index=1),
            GenerationRequest(encode(tokenizer, PROMPTS[2]), 16, SamplingParams(temperature=0), index=2),
        ],
        collector,
    )
    collector.wait()
    assert collector.text(1) == expected


def test_stop_string_and_stop_token(engine, tokenizer):
    prompt = encode(tokenizer, PROMPTS[3])
    tokens, _ = engine.llama.generate([prompt], 12, temperature=0, stop_ids=frozenset())
    full = tokenizer.decode(tokens[0])
    stop_text = full[len(full) // 2 : len(full) // 2 + 2]
    collector = Collector(2)
    engine.submit(
        [
            GenerationRequest(prompt, 12, stop=(stop_text,), index=0),
            GenerationRequest(prompt, 12, stop_ids=frozenset({tokens[0][4]}), index=1),
        ],
        collector,
    )
    collector.wait()
    assert collector.text(0) == full[: full.find(stop_text)]
    assert collector.last(0).finish_reason == "stop"
    assert collector.text(1) == tokenizer.decode(tokens[0][: tokens[0].index(tokens[0][4])])
    assert collector.last(1).finish_reason == "stop"


def test_generation_ends_at_the_context(engine, tokenizer):
    prompt = encode(tokenizer, PROMPTS[1])
    room = engine.max_seq_len - len(prompt)
    collector = Collector(1)
    engine.submit([GenerationRequest(prompt, room)], collector)
    assert collector.wait().last(0).completion_tokens == room
    assert collector.last(0).finish_reason == "length"
    with pytest.raises(ContextLengthError, match="maximum context length is 64"):
        engine.submit([GenerationRequest(prompt, room + 1)], collector)
    for bad in (GenerationRequest([], 4), GenerationRequest([1, 10**6], 4), GenerationRequest([1], 0)):
        with pytest.raises(Llama2Error):
            engine.submit([bad], collector)


def test_logprobs_are_the_models_log_softmax(engine, tokenizer):
    prompt = encode(tokenizer, PROMPTS[0])
    collector = Collector(1)
    engine.submit([GenerationRequest(prompt, 1, top_logprobs=3)], collector)
    entry = collector.wait().last(0).logprobs[0]
    model = engine.llama.model
    model.clear_caches()  # an uncached full forward as the reference
    try:
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([prompt]))[0, -1], dim=-1)
    finally:
        model.setup_caches(engine.num_slots, engine.max_seq_len)
    top = torch.topk(expected, 3)
    assert entry.token == int(top.indices[0])
    assert entry.logprob == pytest.approx(float(top.values[0]), abs=1e-4)
    assert [t for t, _, _ in entry.top] == top.indices.tolist()
    assert [lp for _, _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_full_queue_refuses_and_cancel_frees_the_slot(tokenizer):
    engine = Engine(make_llama(tokenizer, max_batch_size=1, max_seq_len=64), max_queue=1)
    engine.start()
    entered, release = threading.Event(), threading.Event()

    def blocking_sink(event) -> None:  # holds the engine thread inside a step
        entered.set()
        release.wait(30)

    try:
        prompt = encode(tokenizer, PROMPTS[0])
        first = engine.submit([GenerationRequest(prompt, 40)], blocking_sink)
        assert entered.wait(30)
        engine.submit([GenerationRequest(prompt, 3)], Collector(1)).cancel()  # leaves its queue place at once
        waiting = Collector(1)
        engine.submit([GenerationRequest(prompt, 3)], waiting)  # takes the one queue place
        with pytest.raises(QueueFullError, match="busy"):
            engine.submit([GenerationRequest(prompt, 3)], Collector(1))
        first.cancel()
        release.set()
        assert waiting.wait().last(0).finish_reason == "length"  # the cancelled one left its slot
        assert engine.metrics.registry.get_sample_value("llama2_running_sequences") == 0
    finally:
        release.set()
        engine.stop()
    with pytest.raises(EngineClosedError):
        engine.submit([GenerationRequest(prompt, 3)], Collector(1))


def test_a_failed_step_fails_its_sequences_and_the_engine_goes_on(engine, tokenizer):
    steps = engine.batch.steps
    prefill = steps.prefill
    calls = []

    def broken_once(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise RuntimeError("boom")
        return prefill(*args, **kwargs)

    steps.prefill = broken_once
    collector = Collector(1)
    engine.submit([GenerationRequest(encode(tokenizer, "Hi"), 4)], collector)
    assert collector.wait().last(0).finish_reason == "error"
    assert "boom" in collector.last(0).error
    again = Collector(1)
    engine.submit([GenerationRequest(encode(tokenizer, "Hi"), 4)], again)
    assert again.wait().last(0).finish_reason == "length"


def test_stop_ends_waiting_and_running_sequences(tokenizer):
    engine = Engine(make_llama(tokenizer, max_batch_size=1, max_seq_len=64), max_queue=4)
    engine.start()
    entered, release = threading.Event(), threading.Event()
    collector = Collector(2, on_event=lambda e: (entered.set(), release.wait(30)))
    prompt = encode(tokenizer, PROMPTS[0])
    engine.submit([GenerationRequest(prompt, 40, index=0), GenerationRequest(prompt, 40, index=1)], collector)
    assert entered.wait(30)
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    release.set()
    stopper.join(30)
    assert collector.wait().last(1).finish_reason == "error"
    assert "shut down" in collector.last(1).error


def test_per_row_cache_lengths_make_batched_decode_bitwise_single(tokenizer):
    """bfloat16, rows of different lengths: decoded together, each row's logits equal its decode alone."""
    model = make_llama(tokenizer, max_batch_size=3, max_seq_len=64).model.to(torch.bfloat16)
    model.setup_caches(3, 64)
    lengths = [5, 17, 30]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for slot, n in enumerate(lengths):
            prompt = torch.randint(model.args.vocab_size, (1, n), generator=generator)
            model(prompt, torch.arange(n), cache_slots=torch.tensor([slot]))
        tokens = torch.tensor([[11], [22], [33]])
        positions = torch.tensor([[n] for n in lengths])
        kv_lens = [n + 1 for n in lengths]
        together = model(tokens, positions, cache_slots=torch.arange(3), kv_len=kv_lens)
        for i in range(3):
            alone = model(
                tokens[i : i + 1], positions[i : i + 1], cache_slots=torch.tensor([i]), kv_len=kv_lens[i : i + 1]
            )
            assert torch.equal(together[i], alone[0])


def test_answers_do_not_depend_on_what_else_runs_in_bfloat16(tokenizer):
    """bfloat16 magnifies summation-order changes: alone or together, each sequence gives the same tokens."""
    llama = make_llama(tokenizer, max_batch_size=4, max_seq_len=64)
    llama.model.to(torch.bfloat16)
    llama.model.setup_caches(4, 64)
    engine = Engine(llama, prefill_chunk=8)
    engine.start()
    try:
        requests = [GenerationRequest(encode(tokenizer, p), 20, index=i) for i, p in enumerate(PROMPTS)]
        alone = []
        for request in requests:
            collector = Collector(1)
            engine.submit([GenerationRequest(request.prompt_ids, 20)], collector)
            alone.append(collector.wait().text(0))
        together = Collector(len(requests))
        engine.submit(requests, together)
        together.wait()
    finally:
        engine.stop()
    assert [together.text(i) for i in range(len(requests))] == alone
