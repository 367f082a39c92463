"""Clients nobody here wrote, against one live `bytelm serve`: the official openai SDK (async, seeded, streamed
logprobs), LiteLLM, LangChain's ChatOpenAI and its batching OpenAI LLM, structured output, and curl -N. Each client's
text must equal what the raw HTTP API answers to the same greedy request, streamed or not. (test_serve.py checks the
sync SDK against local generation; this file does not repeat it.)

Nothing may leave the machine: litellm fetches a price list (and more) unless told not to and LangChain traces to
LangSmith when its environment says so, so the environment here switches both off, and every connection to anywhere
but loopback is refused at once (not left to time out) and recorded; any attempt fails the module."""

import asyncio
import concurrent.futures as cf
import json
import os
import shutil
import socket
import subprocess
from typing import Literal

import pytest
import torch

# Before litellm is imported, which reads them: litellm fetches its price list (and more: beta headers, tokenizers)
# from the network unless LITELLM_OFFLINE_MODE (litellm/litellm_core_utils/offline_mode.py), or for the price list
# alone in older versions LITELLM_LOCAL_MODEL_COST_MAP, says not to.
os.environ["LITELLM_OFFLINE_MODE"] = "true"
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
for var in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
    os.environ[var] = "false"  # LangChain traces to LangSmith when these are on

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
litellm = pytest.importorskip("litellm")
langchain_openai = pytest.importorskip("langchain_openai")

from pydantic import BaseModel  # noqa: E402
from test_serve import KEY, Server  # noqa: E402

from bytelm import Megabyte, MegabyteConfig  # noqa: E402

# litellm's own types trip a pydantic warning at first use; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Items? .* using the `ReadOnly` qualifier:UserWarning")
NAME = "tiny-bytes"  # the served model's id (--model-name): what every client names
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# --- nothing leaves the machine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Refuse, and record, every name lookup and connection not to loopback while this module runs."""
    attempts: list[str] = []
    real_getaddrinfo, real_connect, real_connect_ex = (socket.getaddrinfo, socket.socket.connect,
                                                       socket.socket.connect_ex)

    def getaddrinfo(host, *args, **kw):
        if host not in LOOPBACK and host is not None:
            attempts.append(f"lookup {host}")
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: no network in these tests")
        return real_getaddrinfo(host, *args, **kw)

    def check(address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in LOOPBACK and not host.startswith("/"):
            attempts.append(f"connect {address}")
            raise ConnectionRefusedError(f"{address}: no network in these tests")

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return real_connect_ex(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket.socket, "connect_ex", connect_ex)
        yield attempts
    assert not attempts, f"a client tried to reach the network: {attempts}"


# --- one server, and the raw API as the reference --------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    torch.manual_seed(0)
    folder = Megabyte(MegabyteConfig.from_name("tiny", max_seq_len=1024)).eval().save_pretrained(
        tmp_path_factory.mktemp("clients") / "tiny")
    s = Server(folder, "--model-name", NAME, "--max-streams", "8", "--max-queue", "64")
    yield s
    s.kill()


def raw_completion(server, prompt: str, max_tokens: int, **kw) -> str:
    r = server.post("/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": max_tokens,
                                        "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def raw_chat(server, messages: list[dict], max_tokens: int, **kw) -> str:
    r = server.post("/v1/chat/completions", {"model": NAME, "messages": messages, "max_tokens": max_tokens,
                                             "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def requests_served(server, endpoint: str) -> float:
    """bytelm_requests_total{code="200"} of an endpoint: how many requests a client's calls became."""
    import httpx

    want = f'bytelm_requests_total{{code="200",endpoint="{endpoint}"}}'
    text = httpx.get(server.url + "/metrics").text
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(want)), 0.0)


# --- the openai SDK ------------------------------------------------------------------------------------------------
def test_async_sdk_concurrent_requests_equal_the_raw_api(server):
    """Four requests at once through AsyncOpenAI (completion and chat, streamed and not), each the raw API's text."""
    want_text = raw_completion(server, "def f(", 40)
    want_chat = raw_chat(server, user("hi"), 40)
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    async def completion(stream: bool) -> str:
        out = await client.completions.create(model=NAME, prompt="def f(", max_tokens=40, temperature=0, stream=stream)
        return "".join([c.choices[0].text async for c in out if c.choices]) if stream else out.choices[0].text

    async def chat(stream: bool) -> str:
        out = await client.chat.completions.create(model=NAME, messages=user("hi"), max_tokens=40, temperature=0,
                                                   stream=stream)
        if stream:
            return "".join([c.choices[0].delta.content or "" async for c in out if c.choices])
        return out.choices[0].message.content

    async def all_four():
        async with client:
            return await asyncio.gather(completion(False), completion(True), chat(False), chat(True))

    assert asyncio.run(all_four()) == [want_text, want_text, want_chat, want_chat]


def test_sdk_seeded_chat_repeats_and_streamed_logprobs_spell_the_text(server):
    client = server.client()
    ask = dict(model=NAME, messages=user("once upon"), max_tokens=40, temperature=1.0, top_p=0.95)
    a, b = (client.chat.completions.create(**ask, seed=7).choices[0].message.content for _ in range(2))
    other = client.chat.completions.create(**ask, seed=8).choices[0].message.content
    assert a == b and a != other  # the seed decides the sample, and only the seed
    chunks = list(client.chat.completions.create(**ask, seed=7, stream=True, logprobs=True, top_logprobs=2))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == a  # streaming does not change a seeded sample
    items = [item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    spelled = bytes(b for item in items for b in item.bytes)
    assert spelled.decode("utf-8", errors="replace") == a  # one logprob per byte, in order, none missing
    assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in items)


# --- LiteLLM ---------------------------------------------------------------------------------------------------------
def test_litellm_completion_and_text_completion(server):
    """litellm's openai/ provider: completion -> /v1/chat/completions, text_completion -> /v1/completions."""
    common = dict(model=f"openai/{NAME}", api_base=server.url + "/v1", api_key=KEY, max_tokens=32, temperature=0)
    want_chat = raw_chat(server, user("hello"), 32)
    out = litellm.completion(messages=user("hello"), **common)
    assert out.choices[0].message.content == want_chat
    stream = litellm.completion(messages=user("hello"), stream=True, **common)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want_chat

    want_text = raw_completion(server, "import ", 32)
    out = litellm.text_completion(prompt="import ", **common)
    assert out.choices[0].text == want_text
    stream = litellm.text_completion(prompt="import ", stream=True, **common)
    assert "".join(c.choices[0].text or "" for c in stream) == want_text


# --- LangChain -------------------------------------------------------------------------------------------------------
def chat_model(server, max_tokens: int = 32):
    return langchain_openai.ChatOpenAI(model=NAME, base_url=server.url + "/v1", api_key=KEY, temperature=0,
                                       max_tokens=max_tokens, max_retries=0, timeout=60)


def test_langchain_chat_openai_invoke_stream_batch(server):
    prompts = ["hello", "what is 2+2?", "écris un poème"]
    want = [raw_chat(server, user(p), 32) for p in prompts]
    llm = chat_model(server)
    assert llm.invoke(prompts[0]).content == want[0]
    assert "".join(chunk.content for chunk in llm.stream(prompts[1])) == want[1]
    assert [m.content for m in llm.batch(prompts)] == want


def test_langchain_openai_llm_batch_of_25_prompts(server):
    """LangChain's completion LLM sends its prompts 20 to a request (batch_size): 25 prompts are two requests, and
    each answer is the one its prompt gets alone."""
    prompts = [f"{i} " + "xy" * (i % 5) for i in range(25)]
    with cf.ThreadPoolExecutor(8) as pool:  # the references, one request each, decoded side by side
        want = list(pool.map(lambda p: raw_completion(server, p, 24), prompts))
    llm = langchain_openai.OpenAI(model=NAME, base_url=server.url + "/v1", api_key=KEY, temperature=0, max_tokens=24,
                                  max_retries=0, timeout=60)
    before = requests_served(server, "/v1/completions")
    assert llm.batch(prompts) == want
    assert requests_served(server, "/v1/completions") - before == 2  # 20 + 5 prompts: lists, not one at a time


class Pet(BaseModel):
    """A finite language: a constrained decoder ends within a few dozen bytes whatever the model prefers."""

    kind: Literal["cat", "dog", "fish"]
    indoor: bool


def test_langchain_structured_output_json_schema(server):
    """with_structured_output(method="json_schema") sends response_format; the server must honour it (an untrained
    model writes no JSON by itself), so the reply parses as the schema, and the same schema through the raw API
    does too."""
    llm = chat_model(server, max_tokens=200).with_structured_output(Pet, method="json_schema", include_raw=True)
    out = llm.invoke("Describe a pet as JSON.")
    assert out["parsing_error"] is None and isinstance(out["parsed"], Pet), out
    assert Pet.model_validate_json(out["raw"].content) == out["parsed"]
    fmt = {"type": "json_schema", "json_schema": {"name": "Pet", "schema": Pet.model_json_schema(), "strict": True}}
    text = raw_chat(server, user("Describe a pet as JSON."), 200, response_format=fmt)
    Pet.model_validate_json(text)


# --- curl --------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_streams_what_the_raw_api_answers(server):
    want = raw_completion(server, "curl ", 48)
    body = json.dumps({"model": NAME, "prompt": "curl ", "max_tokens": 48, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", "--fail-with-body", "--max-time", "30", server.url + "/v1/completions",
                          "-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    events = [line[6:] for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == want

