"""The server's hardening, each case from issue 20 against a live `bytelm serve`: bounded stop sequences matched in
linear time, a 400 (never a 500, never a 200 and then an error event) for every bad value, metrics labelled by route,
abandoned non-streamed requests freed at once, the key checked before the body, bodies bounded in size and time, the
Host header checked on loopback, strict types, `tool` turns and a clear answer for /v1/responses."""

import json
import socket
import time

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from bytelm import Megabyte, MegabyteConfig  # noqa: E402
from bytelm.cli.serve import allowed_hosts  # noqa: E402
from bytelm.serve.protocol import ChatMessage, chat_prompt  # noqa: E402
from tests.test_serve import KEY, Server  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = Megabyte(MegabyteConfig.from_name("tiny", max_seq_len=1024)).eval()
    return model.save_pretrained(tmp_path_factory.mktemp("served") / "tiny")


@pytest.fixture(scope="module")
def server(folder):
    s = Server(folder, "--max-streams", "2", "--max-queue", "2", "--body-timeout", "1", "--allowed-hosts", "my.box")
    yield s
    s.kill()


def _post(server, path, body, headers=JSON, **kw):
    """json.dumps escapes lone surrogates as \\ud800, as a client's JSON would (httpx's json= cannot send them)."""
    return httpx.post(server.url + path, content=json.dumps(body), headers=headers, **{"timeout": 30, **kw})


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"  # a refusal, not a stream that starts and then fails
    return r.json()["error"]


def _health(server) -> dict:
    return httpx.get(server.url + "/health").json()


# --- stop sequences: bounded, and matched in linear time outside the lock ---------------------------------------
def test_9000_long_stop_strings_are_a_fast_400_and_the_bound_is_accepted(server):
    t0 = time.monotonic()
    err = _error(_post(server, "/v1/completions", {"prompt": "x", "max_tokens": 5, "stop": ["y" * 100] * 9000}), 400)
    assert time.monotonic() - t0 < 5 and err["param"] == "stop"  # it took 58 s holding the engine
    assert "at most 16 stop sequences of at most 256 bytes" in err["message"]
    for stop in (["s"] * 17, ["é" * 129]):  # 17 sequences; 258 UTF-8 bytes
        assert _error(_post(server, "/v1/completions", {"prompt": "x", "stop": stop, "stream": True}), 400)
    r = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5,
                                                 "stop": [f"{i:02d}" + "q" * 254 for i in range(16)]})
    assert r.status_code == 200, r.text  # chat's own turn marker comes on top of the 16


def _timed_pair(server, stops: list[str]) -> float:
    """Seconds a 200-byte request takes while a 700-byte request with these stop sequences decodes beside it."""
    with httpx.Client(timeout=60, headers=JSON) as a, httpx.Client(timeout=60, headers=JSON) as b:
        with a.stream("POST", server.url + "/v1/completions", content=json.dumps(
                {"prompt": "z", "max_tokens": 700, "temperature": 0, "stop": stops, "stream": True})) as long:
            lines = long.iter_lines()  # kept: a dropped iterator closes the response, and the server cancels it
            next(lines)  # decoding
            t0 = time.monotonic()
            r = b.post(server.url + "/v1/completions", content=json.dumps({"prompt": "a", "max_tokens": 200,
                                                                            "temperature": 0}))
            took = time.monotonic() - t0
            assert r.status_code == 200 and _health(server)["active_streams"] == 1  # the long one still runs
    return took


def test_stop_sequences_at_the_bound_do_not_slow_a_concurrent_request(server):
    """The issue: 9,000 stop strings took a concurrent 200-byte request from 0.17 s to 29 s. At the bound (16 of 256
    bytes) it takes about what it takes beside a request without any (best of 2 each, a 2x margin for noise)."""
    bound = [f"{i:02d}" + "q" * 254 for i in range(16)]
    plain = min(_timed_pair(server, []) for _ in range(2))
    stopped = min(_timed_pair(server, bound) for _ in range(2))
    assert stopped < 2 * plain + 0.1, (plain, stopped)


# --- what were 500s, and lax types: a 400 naming the field, streamed or not ---------------------------------------
CHAT = "/v1/chat/completions"
BAD = [
    ("/v1/completions", {"prompt": "x", "seed": 2**64, "temperature": 0.8}, "seed"),
    ("/v1/completions", {"prompt": "x", "seed": -1, "temperature": 0.8}, "seed"),
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": ["\ud800"]}, "prompt[0]"),
    ("/v1/completions", {"prompt": "x", "stop": "\ud800"}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["ok", "a\ud800"]}, "stop[1]"),
    (CHAT, {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": [
        {"type": "text", "text": "\udfff"}]}]}, "messages[1].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ("/v1/completions", {"prompt": "x", "temperature": 1e-45}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1e-300}, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stream": "true"}, "stream"),
    ("/v1/completions", {"prompt": [True, False]}, "prompt[0]"),
    ("/v1/completions", {"prompt": "x", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_k": 0}, "top_k"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
]


def test_tokenize_refuses_text_that_is_not_unicode(server):
    for prompt in ["\ud800", "<|endoftext|>a\udfff"]:
        assert "prompt: not valid Unicode" in _error(_post(server, "/tokenize", {"prompt": prompt}), 400)["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, body, field", BAD, ids=[f for _, _, f in BAD])
def test_each_former_500_and_each_lax_type_is_a_400_naming_the_field(server, path, body, field, stream):
    body = {"stream": stream, "max_tokens": 4, **body}
    err = _error(_post(server, path, body), 400)
    assert err["message"].startswith(f"{field}") or f"{field} " in err["message"], err
    assert err["param"] == field or err["param"] is None, err


def test_the_server_answers_after_every_refusal_and_json_ints_stay_numbers(server):
    r = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 3, "temperature": 1, "top_p": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_top_k_minus_one_is_off(server):
    body = {"prompt": "k", "max_tokens": 24, "temperature": 0.9, "seed": 5}
    off = _post(server, "/v1/completions", body).json()["choices"][0]["text"]
    assert _post(server, "/v1/completions", {**body, "top_k": -1}).json()["choices"][0]["text"] == off


# --- tool turns, /v1/responses ------------------------------------------------------------------------------------
def test_tool_messages_are_their_own_turn(server):
    msgs = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None},
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    want = b"<|user|>\nweather?\n<|assistant|>\n\n<|tool|>\nsunny\n<|assistant|>\n"
    assert chat_prompt([ChatMessage(**m) for m in msgs]) == want
    r = _post(server, CHAT, {"messages": msgs, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(want)


def test_the_responses_api_is_a_clear_404_naming_the_endpoint_to_use(server):
    err = _error(_post(server, "/v1/responses", {"model": "m", "input": "hi"}), 404)
    assert "/v1/chat/completions" in err["message"] and err["code"] == "unsupported_endpoint"


# --- metrics by route ---------------------------------------------------------------------------------------------
def test_requests_to_unknown_paths_do_not_grow_the_metrics(server):
    before = httpx.get(server.url + "/metrics").text
    with httpx.Client(headers=AUTH) as c:
        for i in range(300):
            assert c.get(f"{server.url}/nope/{i}/{'x' * 50}").status_code == 404
        assert c.post(server.url + "/v1/completions", content=b"{", headers={"Authorization": "no"}).status_code \
            == 401
    after = httpx.get(server.url + "/metrics").text
    assert len(after) - len(before) < 1000 and "/nope" not in after  # a few new labels; it grew 3.7 KB -> 33 MB
    count = next(line for line in after.splitlines() if 'endpoint="unmatched"' in line and 'code="404"' in line)
    assert float(count.split()[-1]) >= 300
    assert 'bytelm_requests_total{code="401",endpoint="/v1/completions"}' in after  # refused before routing


# --- abandoned non-streamed requests ----------------------------------------------------------------------------
def test_a_client_that_gives_up_on_a_non_streamed_request_frees_its_slot_at_once(server):
    """The openai SDK retries on a timeout; the retry must not queue behind its own ghost."""
    metrics = lambda: httpx.get(server.url + "/metrics").text  # noqa: E731
    generated = lambda: float(next(x.split()[1] for x in metrics().splitlines()  # noqa: E731
                                   if x.startswith("bytelm_generated_bytes_total")))
    before = generated()
    with pytest.raises(httpx.ReadTimeout):
        _post(server, "/v1/completions", {"prompt": "z", "max_tokens": 1000, "temperature": 0}, timeout=0.5)
    t0 = time.monotonic()
    while _health(server)["active_streams"]:
        assert time.monotonic() - t0 < 1.0, "the abandoned request still holds its slot"
        time.sleep(0.01)
    assert generated() - before < 1000  # stopped, not run to its end


# --- the guard: key before body, bodies bounded in size and time, Host on loopback --------------------------------
def test_the_key_is_checked_before_the_body_is_read_or_parsed(server):
    for content in (b"{not json", b"x" * 2_000_000):
        r = httpx.post(server.url + "/v1/completions", content=content, headers={"Content-Type": "application/json"})
        assert _error(r, 401)["code"] == "invalid_api_key"
    assert _error(httpx.post(server.url + "/v1/completions", content=b"{not json", headers=JSON), 400)
    assert httpx.get(server.url + "/health").status_code == 200  # open paths stay open


def test_a_chunked_body_over_the_limit_is_a_413(server):
    def chunks():
        for _ in range(20):
            yield b"x" * 65536  # 1.25 MiB, over the default 1 MiB, with no Content-Length

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers=JSON, timeout=30)
    assert _error(r, 413)["code"] == "request_too_large"


def test_a_body_that_stops_arriving_gets_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        t0 = time.monotonic()
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408") and b"stopped arriving" in reply
    assert 0.9 < time.monotonic() - t0 < 20  # --body-timeout 1, not the default 30 s (a loaded machine is slow)


@pytest.mark.parametrize("host, ok", [("evil.example", False), ("localhost.evil.example", False),
                                      ("localhost", True), ("127.0.0.1", True), ("[::1]", True), ("my.box", True),
                                      ("LOCALHOST", True)])
def test_a_loopback_server_answers_only_to_loopback_host_names(server, host, ok):
    r = httpx.get(f"{server.url}/v1/models", headers={**AUTH, "Host": f"{host}:{server.port}"})
    if ok:
        assert r.status_code == 200
    else:
        assert "not one this server answers to" in _error(r, 400)["message"]


def test_allowed_hosts_on_and_off_loopback():
    assert allowed_hosts("127.0.0.1", []) == ("localhost", "127.0.0.1", "[::1]")
    assert allowed_hosts("::1", ["a.b"])[-1] == "a.b"
    assert allowed_hosts("0.0.0.0", []) is None and allowed_hosts("0.0.0.0", ["a.b"]) == ("a.b",)
