"""`llama2 serve` as a real server process, driven by the official `openai` client and raw HTTP.

Most tests use a tiny random Hugging Face Llama with Meta's tokenizer (fast); the
`model`-marked ones use the default SmolLM2-135M-Instruct. References are independent
of the server: `Llama.chat_completion` / `text_completion` in this process, and
transformers' logits for log-probabilities.
"""

import json
import os
import shutil
import signal
import threading
import time

import httpx
import pytest
import torch

from llama2.generation import Llama
from llama2.serve.process import ServerProcess
from llama2.tokenizer import llama2_tokenizer_path

from helpers import make_hf_llama

openai = pytest.importorskip("openai")

API_KEY = "test-key-123"
TINY_CONTEXT = 512
DIALOG = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, transformers model): a random tiny HF Llama, Meta's tokenizer, 512-token context."""
    folder = tmp_path_factory.mktemp("tiny-serve")
    hf_model = make_hf_llama(folder, gqa=True, vocab_size=32000)
    shutil.copy(llama2_tokenizer_path(), folder / "tokenizer.model")
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = TINY_CONTEXT  # room for long generations (disconnect tests)
    (folder / "config.json").write_text(json.dumps(config))
    return folder, hf_model


@pytest.fixture(scope="module")
def server(tiny):
    with ServerProcess("--model", str(tiny[0]), "--api-key", API_KEY, "--max-batch-size", "4") as process:
        yield process


@pytest.fixture(scope="module")
def reference(tiny) -> Llama:
    return Llama.build(tiny[0], max_seq_len=TINY_CONTEXT, max_batch_size=1)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def model_name(tiny) -> str:
    return tiny[0].name


def metric(http: httpx.Client, name: str) -> float:
    """The value of one sample in /metrics (0 when absent)."""
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def sse_chunks(response: httpx.Response) -> list:
    """The JSON chunks of a server-sent event stream, checking it ends with [DONE]."""
    data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


# ---------------------------------------------------------------------------- happy paths


def test_models_health_and_metrics(client, http, server, tiny):
    assert [m.id for m in client.models.list().data] == [model_name(tiny)]
    assert client.models.retrieve(model_name(tiny)).id == model_name(tiny)
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}  # no key needed
    text = http.get("/metrics").text
    for name in (
        "llama2_queue_depth",
        "llama2_time_to_first_token_seconds_bucket",
        "llama2_generation_tokens_total",
        "llama2_generation_tokens_per_second",
        "llama2_http_requests_total",
    ):
        assert name in text


def test_chat_greedy_equals_llama_chat_completion(client, reference, tiny):
    answer = client.chat.completions.create(model=model_name(tiny), messages=DIALOG, temperature=0, max_tokens=24)
    expected = reference.chat_completion([DIALOG], temperature=0, max_gen_len=24)[0]["generation"]["content"]
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].message.role == "assistant"
    prompt_ids = reference.chat_format.encode_dialog_prompt(DIALOG)
    tokens, _ = reference.generate([prompt_ids], 24, temperature=0, stop_ids=reference.chat_format.stop_ids)
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.completion_tokens == len(tokens[0])
    assert answer.choices[0].finish_reason == ("length" if len(tokens[0]) == 24 else "stop")


def test_completion_and_its_stream_equal_text_completion(client, reference, tiny):
    prompt = "The llama is"
    expected = reference.text_completion([prompt], temperature=0, max_gen_len=20)[0]["generation"]
    whole = client.completions.create(model=model_name(tiny), prompt=prompt, temperature=0, max_tokens=20)
    assert whole.choices[0].text == expected
    stream = client.completions.create(
        model=model_name(tiny),
        prompt=prompt,
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert (
        chunks[-1].usage.prompt_tokens
        == whole.usage.prompt_tokens
        == 1 + len(reference.tokenizer.encode(prompt, bos=False, eos=False))
    )


def test_chat_stream_equals_non_stream(client, tiny):
    options = dict(model=model_name(tiny), messages=DIALOG[1:2], temperature=0, max_tokens=30)
    whole = client.chat.completions.create(**options).choices[0]
    chunks = list(client.chat.completions.create(**options, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_logprobs_match_transformers(client, reference, tiny):
    hf_model = tiny[1]
    answer = client.chat.completions.create(
        model=model_name(tiny), messages=DIALOG[1:2], temperature=0, max_tokens=2, logprobs=True, top_logprobs=3
    )
    prompt_ids = reference.chat_format.encode_dialog_prompt(DIALOG[1:2])
    with torch.no_grad():
        expected = torch.log_softmax(hf_model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].float(), dim=-1)
    first = answer.choices[0].logprobs.content[0]
    top = torch.topk(expected, 3)
    assert first.logprob == pytest.approx(float(top.values[0]), abs=1e-4)
    assert first.token == reference.tokenizer.decode([int(top.indices[0])])
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    completion = client.completions.create(model=model_name(tiny), prompt="Hi", temperature=0, max_tokens=3, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 3
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert all(
        max(top.values()) == pytest.approx(lp)
        for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True)
    )


def test_seeded_choices_are_reproducible(client, tiny):
    options = dict(model=model_name(tiny), prompt="Once", temperature=1.0, max_tokens=12, n=2, seed=42)
    first, second = client.completions.create(**options), client.completions.create(**options)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.choices[0].text != first.choices[1].text  # seed + index per choice
    assert first.usage.completion_tokens == 24


def test_stop_strings_cut_the_text(client, tiny):
    options = dict(model=model_name(tiny), prompt="Once upon", temperature=0, max_tokens=24)
    full = client.completions.create(**options).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    for stream in (False, True):
        answer = client.completions.create(**options, stop=[stop, "never-seen"], stream=stream)
        chunks = list(answer) if stream else [answer]
        assert "".join(c.choices[0].text for c in chunks) == full[: full.find(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------- bad input


def _post(path, payload):
    return ("POST", path, payload)


BAD_REQUESTS = [
    ("malformed json", "POST", "/v1/chat/completions", b'{"messages": [', 400, None),
    ("not an object", "POST", "/v1/completions", b"[1, 2]", 400, None),
    ("no body", "POST", "/v1/completions", b"", 400, None),
    ("max_tokens string", *_post("/v1/completions", {"prompt": "a", "max_tokens": "12"}), 400, "max_tokens"),
    ("temperature string", *_post("/v1/completions", {"prompt": "a", "temperature": "hot"}), 400, "temperature"),
    ("messages string", *_post("/v1/chat/completions", {"messages": "hi"}), 400, "messages"),
    ("stream string", *_post("/v1/completions", {"prompt": "a", "stream": "yes"}), 400, "stream"),
    ("negative max_tokens", *_post("/v1/completions", {"prompt": "a", "max_tokens": -5}), 400, "max_tokens"),
    ("absurd max_tokens", *_post("/v1/completions", {"prompt": "a", "max_tokens": 10**15}), 400, None),
    ("huge int", *_post("/v1/completions", {"prompt": "a", "seed": 10**40}), 400, "seed"),
    ("unknown field", *_post("/v1/completions", {"prompt": "a", "best_friend": 1}), 400, "best_friend"),
    ("unknown model", *_post("/v1/completions", {"prompt": "a", "model": "gpt-9"}), 404, "model"),
    ("prompt over context", *_post("/v1/completions", {"prompt": "word " * 600}), 400, None),
    ("bad token id", *_post("/v1/completions", {"prompt": [1, 99999999]}), 400, None),
    ("too many choices", *_post("/v1/completions", {"prompt": "a", "n": 9}), 400, "n"),
    ("empty messages", *_post("/v1/chat/completions", {"messages": []}), 400, "messages"),
    (
        "bad role",
        *_post("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}),
        400,
        "messages.0.role",
    ),
    (
        "llama-2 tags",
        *_post("/v1/chat/completions", {"messages": [{"role": "user", "content": "[INST] x"}]}),
        400,
        "messages",
    ),
    ("top_p zero", *_post("/v1/chat/completions", {"messages": DIALOG[1:2], "top_p": 0}), 400, "top_p"),
    ("unsupported penalty", *_post("/v1/completions", {"prompt": "a", "presence_penalty": 1}), 400, "presence_penalty"),
    ("unknown path", "GET", "/v1/engines", None, 404, None),
    ("wrong method", "GET", "/v1/completions", None, 405, None),
]


@pytest.mark.parametrize(
    ("case", "method", "path", "body", "status", "param"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_input_is_a_4xx_in_openai_shape(http, case, method, path, body, status, param):
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    response = http.request(method, path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param


def test_errors_through_the_openai_client_and_the_server_keeps_serving(client, server, http, tiny):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=model_name(tiny), prompt="a", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="maximum context length") as caught:
        client.chat.completions.create(model=model_name(tiny), messages=[{"role": "user", "content": "w " * 600}])
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError, match="does not exist") as caught:
        client.chat.completions.create(model="gpt-4o", messages=DIALOG[1:2])
    assert caught.value.code == "model_not_found"
    for key in ("wrong-key", ""):
        bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key or "x", max_retries=0)
        if not key:
            bad = bad.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert httpx.get(server.base_url + "/metrics").status_code == 401
    too_big = b'{"prompt": "' + b"a" * (5 << 20) + b'"}'
    assert http.post("/v1/completions", content=too_big).status_code == 413
    answer = client.chat.completions.create(model=model_name(tiny), messages=DIALOG[1:2], temperature=0, max_tokens=4)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert server.process.poll() is None


def test_client_disconnect_frees_the_slot_at_once(http, tiny):
    cancelled = metric(http, 'llama2_sequences_finished_total{reason="cancelled"}')
    payload = {"model": model_name(tiny), "prompt": "Go", "max_tokens": TINY_CONTEXT - 8, "stream": True}
    with http.stream("POST", "/v1/completions", json=payload) as response:
        next(response.iter_lines())  # generation has started; now leave
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        http.post("/v1/completions", json={**payload, "stream": False}, timeout=0.5)
    while metric(http, 'llama2_sequences_finished_total{reason="cancelled"}') < cancelled + 2:
        assert time.monotonic() - started < 10, "disconnected requests still hold their slots"
        time.sleep(0.05)
    assert metric(http, "llama2_running_sequences") == 0


def test_full_queue_is_a_429(tiny):
    """In process: an engine with one slot and no queue, its slot held by a stalled sequence."""
    from fastapi.testclient import TestClient

    from llama2.serve.api import create_app
    from llama2.serve.engine import Engine, GenerationRequest

    engine = Engine(Llama.build(tiny[0], max_seq_len=64, max_batch_size=1), max_queue=0)
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()

    def stalling_sink(event) -> None:
        entered.set()
        release.wait(30)
        if event.finish_reason:
            finished.set()

    with TestClient(create_app(engine, "tiny")) as test_client:
        engine.submit([GenerationRequest([1, 2, 3], 8)], stalling_sink)
        assert entered.wait(30)
        busy = test_client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        release.set()
        assert busy.status_code == 429
        assert busy.json()["error"]["type"] == "rate_limit_exceeded" and "busy" in busy.json()["error"]["message"]
        assert finished.wait(30)
        assert test_client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_sigint_lets_the_in_flight_stream_finish(tiny):
    process = ServerProcess("--model", str(tiny[0]))
    with process:
        payload = {"prompt": "Go", "max_tokens": 200, "stream": True, "temperature": 0}
        with httpx.stream("POST", process.base_url + "/v1/completions", json=payload, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            process.process.send_signal(signal.SIGINT)
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
        assert process.stop() == 0
        assert "stopped" in process.log()


# ---------------------------------------------------------------------------- the chat page


def test_chat_page_in_headless_chromium(server, client, tiny):
    """Type two turns into the page; each answer on the page equals the API's greedy answer."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=args)
        try:
            page = browser.new_page()
            page.goto(server.base_url + "/")
            page.fill("#api-key", API_KEY)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "12")
            page.fill("#system", "You are terse.")
            dialog = [{"role": "system", "content": "You are terse."}]
            for turn, message in enumerate(["Name a colour.", "Another one?"]):
                page.fill("#input", message)
                page.click("#send")
                bubble = page.locator(".msg.assistant").nth(turn)
                bubble.and_(page.locator("[data-state=done]")).wait_for(timeout=30_000)
                dialog.append({"role": "user", "content": message})
                expected = (
                    client.chat.completions.create(
                        model=model_name(tiny), messages=dialog, temperature=0, max_tokens=12
                    )
                    .choices[0]
                    .message.content
                )
                assert bubble.text_content() == expected
                dialog.append({"role": "assistant", "content": expected})
            assert page.locator(".msg.user").count() == 2
            assert "tokens in" in page.text_content("#status")
        finally:
            browser.close()


# ---------------------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def default_server(default_model_path):
    with ServerProcess(
        "--model", str(default_model_path), "--max-seq-len", "512", "--served-model-name", "smollm2"
    ) as p:
        yield p


@pytest.fixture(scope="module")
def default_llama(default_model_path) -> Llama:
    return Llama.build(default_model_path, max_seq_len=512, max_batch_size=1)


DEFAULT_DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a fact about llamas."},
    ],
    [{"role": "user", "content": "List three prime numbers."}],
]
DEFAULT_MAX_TOKENS = 20


@pytest.mark.model
def test_default_model_greedy_over_http_equals_llama_even_when_concurrent(default_server, default_llama):
    """One request, then all dialogs streamed at once: every answer equals `Llama.chat_completion`'s."""
    expected = [
        default_llama.chat_completion([d], temperature=0, max_gen_len=DEFAULT_MAX_TOKENS)[0]["generation"]["content"]
        for d in DEFAULT_DIALOGS
    ]
    client = openai.OpenAI(base_url=default_server.base_url + "/v1", api_key="none", max_retries=0, timeout=300)
    options = dict(model="smollm2", temperature=0, max_tokens=DEFAULT_MAX_TOKENS)
    single = client.chat.completions.create(messages=DEFAULT_DIALOGS[1], **options)
    assert single.choices[0].message.content == expected[1]
    prompt = "The three primary colours are"
    completion = client.completions.create(prompt=prompt, **options).choices[0].text
    assert completion == default_llama.text_completion([prompt], temperature=0, max_gen_len=20)[0]["generation"]

    answers = [None] * len(DEFAULT_DIALOGS)

    def stream(i: int) -> None:
        chunks = client.chat.completions.create(messages=DEFAULT_DIALOGS[i], stream=True, **options)
        answers[i] = "".join(c.choices[0].delta.content or "" for c in chunks)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(DEFAULT_DIALOGS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert answers == expected
