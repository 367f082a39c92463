"""`bytelm serve` as a user runs it: a real server process on a free loopback port, driven by the official `openai`
client (streamed and not, completions and chat) and by plain HTTP for the faults. Every server is started in a
session of its own and killed by process group."""

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from bytelm import Megabyte, MegabyteConfig  # noqa: E402
from bytelm.serve.protocol import CHAT_STOP, ChatMessage, chat_prompt  # noqa: E402

KEY = "sk-test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder, *flags):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bytelm.cli", "serve", str(folder), "--port", str(self.port), "--api-key", KEY,
             "--log-level", "warning", "--device", "cpu", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read().decode()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.kill()
        raise RuntimeError("server did not start in 60 s")

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60, **kw)

    def post(self, path, body, key=KEY, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=30, **kw)

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = Megabyte(MegabyteConfig.from_name("tiny", max_seq_len=1024)).eval()
    return model.save_pretrained(tmp_path_factory.mktemp("served") / "tiny"), model


@pytest.fixture(scope="module")
def server(folder):
    s = Server(folder[0], "--max-streams", "4", "--max-queue", "2", "--max-request-bytes", "20000")
    yield s
    s.kill()


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def test_completions_equal_local_generation(server, folder):
    model = folder[1]
    want = model.generate(b"def main(", 40, temperature=0)
    client = server.client()
    out = client.completions.create(model=str(folder[0]), prompt="def main(", max_tokens=40, temperature=0)
    assert out.choices[0].text == _text(want)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (9, 40)
    chunks = list(client.completions.create(model=str(folder[0]), prompt="def main(", max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == _text(want)
    assert chunks[-1].usage.completion_tokens == 40
    seeded = [client.completions.create(model=str(folder[0]), prompt="x", max_tokens=30, temperature=0.9,
                                        seed=11).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1] == _text(model.generate(b"x", 30, temperature=0.9, seed=11))


def test_chat_equals_local_generation_of_the_template(server, folder):
    model = folder[1]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    prompt = chat_prompt([ChatMessage(**m) for m in messages])
    assert prompt == b"<|system|>\nbe brief\n<|user|>\nhello\n<|assistant|>\n"
    want = model.generate(prompt, 60, temperature=0)
    cut = want.find(CHAT_STOP.encode())
    want = want if cut < 0 else want[:cut]
    client = server.client()
    out = client.chat.completions.create(model=str(folder[0]), messages=messages, max_tokens=60, temperature=0)
    assert out.choices[0].message.content == _text(want) and out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=str(folder[0]), messages=messages, max_tokens=60, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == _text(want)


def test_stream_deltas_are_always_whole_utf8_characters(server):
    """A multi-byte character is never split across chunks: every delta decodes on its own."""
    client = server.client()
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "é", "max_tokens": 200, "temperature": 1.0, "seed": 3, "stream": True},
                      timeout=30) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert all(t.encode("utf-8").decode("utf-8") == t for t in texts)  # valid UTF-8 strings, no surrogates
    assert len(client.models.list().data) == 1


def test_logprobs_carry_each_byte(server, folder):
    client = server.client()
    out = client.chat.completions.create(model=str(folder[0]), messages=[{"role": "user", "content": "a"}],
                                         max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert 1 <= len(content) <= 5
    for item in content:
        assert len(item.bytes) == 1 and len(item.top_logprobs) == 3
        assert item.logprob == max(t.logprob for t in item.top_logprobs)  # greedy picks the likeliest byte
    comp = server.post("/v1/completions", {"prompt": "a", "max_tokens": 4, "logprobs": 2}).json()
    lp = comp["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4


@pytest.mark.parametrize("body, key, status, fragment", [
    ({"prompt": "x"}, None, 401, "API key"),
    ({"prompt": "x"}, "wrong", 401, "API key"),
    ({"prompt": "x", "max_tokens": "many"}, KEY, 400, "max_tokens"),
    ({"prompt": 5}, KEY, 400, "prompt"),
    ({"prompt": "x", "temperature": -1}, KEY, 400, "temperature"),
    ({"prompt": "x", "max_tokens": 5000}, KEY, 400, "max_seq_len"),
    ({"prompt": "x", "n": 2}, KEY, 400, "n: not supported"),
    ({"prompt": "x", "model": "gpt-4"}, KEY, 404, "not served here"),
    ({"prompt": [1, 2, 300]}, KEY, 400, "prompt"),
    ({"messages": []}, KEY, 400, "messages"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, body, key, status, fragment):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = server.post(path, body, key=key)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert server.post("/v1/completions", {"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_malformed_and_oversized_bodies(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x", ', headers=headers)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=json.dumps({"prompt": "x" * 30000}), headers=headers)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing", headers=headers).status_code == 404
    assert httpx.get(server.url + "/v1/nothing").status_code == 401  # the key first: no path is told to a stranger
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def _wait(server, cond, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        h = httpx.get(server.url + "/health").json()
        if cond(h):
            return h
        time.sleep(0.02)
    raise AssertionError(f"timed out; last health {h}")


def _generated(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("bytelm_generated_bytes_total")))


def test_full_server_answers_429_and_disconnects_free_slots(server):
    """4 streams + 2 waiting fill it: the next request gets 429 with Retry-After. Clients that hang up mid-stream
    free their slots at once (the engine's next step), and the server serves again."""
    long = {"prompt": "z", "max_tokens": 1000, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    clients = [httpx.Client(timeout=30) for _ in range(6)]
    streams = []
    before = _generated(server)
    try:
        for c in clients:
            cm = c.stream("POST", server.url + "/v1/completions", json=long, headers=headers)
            r = cm.__enter__()
            assert r.status_code == 200
            streams.append((cm, r))
        _wait(server, lambda h: h["active_streams"] == 4 and h["queue_length"] == 2)
        r = server.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        for _cm, r in streams:
            next(r.iter_lines())  # reading mid-stream
    finally:
        for c in clients:
            c.close()  # hang up mid-stream
    t0 = time.monotonic()
    _wait(server, lambda h: h["active_streams"] == 0 and h["queue_length"] == 0)
    assert time.monotonic() - t0 < 5
    assert _generated(server) - before < 1000  # not the 6 x 1000 bytes asked for: the hang-ups stopped them
    metrics = httpx.get(server.url + "/metrics").text
    assert 'bytelm_requests_total{code="429",endpoint="/v1/completions"}' in metrics
    assert server.post("/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_32_concurrent_streams_each_get_what_they_get_alone(folder):
    """The load test: 32 streaming clients at once (greedy), twice; each stream equals its prompt decoded alone,
    nothing is dropped, and the second round leaves the server's memory where the first left it."""
    model = folder[1]
    prompts = [f"{i}: " + "ab" * (i % 7) for i in range(32)]
    want = [_text(model.generate(p.encode(), 48, temperature=0)) for p in prompts]
    s = Server(folder[0], "--max-streams", "16", "--max-queue", "32")
    try:
        def one(i):
            chunks = s.client().completions.create(model=str(folder[0]), prompt=prompts[i], max_tokens=48,
                                                   temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)

        rss = []
        for _ in range(3):
            with cf.ThreadPoolExecutor(32) as pool:
                got = list(pool.map(one, range(32)))
            assert got == want
            _wait(s, lambda h: h["active_streams"] == 0)
            rss.append(s.rss_kb())
        assert rss[2] - rss[1] < 8 * 1024, rss  # KiB: no growth once warm
        metrics = httpx.get(s.url + "/metrics").text
        assert "bytelm_generated_bytes_total 4608.0" in metrics  # 3 x 32 x 48: none dropped
        assert "bytelm_prefill_calls_total" in metrics and "bytelm_held_steps_total" in metrics
    finally:
        s.kill()


def test_ctrl_c_drains_running_streams_and_exits_cleanly(folder):
    s = Server(folder[0])
    try:
        with httpx.stream("POST", s.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"prompt": "q", "max_tokens": 300, "temperature": 0, "stream": True},
                          timeout=30) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            os.killpg(s.proc.pid, signal.SIGINT)  # Ctrl-C
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"  # the running stream finished
        text = "".join(json.loads(x[6:])["choices"][0]["text"] for x in [first, *rest[:-1]])
        assert text == _text(folder[1].generate(b"q", 300, temperature=0))
        assert s.proc.wait(30) == 0
    finally:
        s.kill()
