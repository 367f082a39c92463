"""Structured outputs: every document a constrained request finishes ("stop") parses and validates against its schema,
from an untrained model (near-random bytes: the hardest case), in the engine and through the server, streamed and
not; unconstrained rows beside constrained ones keep their bytes; a schema that cannot be honoured is refused up
front (a GenerationError, an HTTP 400 naming response_format), never a 500."""

import json

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from bytelm.errors import GenerationError  # noqa: E402
from bytelm.generation import Engine, JsonSchema, SamplingParams  # noqa: E402
from bytelm.generation.constrain import END_BYTE  # noqa: E402

OBJ = {"type": "object", "additionalProperties": False}
# Bounded so a random model's documents end: strings have a maxLength, arrays a maxItems, integers a range, numbers a
# multipleOf (without one a number's digits are unbounded, and a random model may write digits until max_tokens).
SCHEMAS = {
    "flat": {**OBJ, "properties": {"name": {"type": "string", "maxLength": 8},
                                   "age": {"type": "integer", "minimum": 0, "maximum": 120}},
             "required": ["name", "age"]},
    "enum": {**OBJ, "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                                   "none": {"type": "null"}}, "required": ["color", "ok", "none"]},
    "nested": {**OBJ, "properties": {"user": {**OBJ, "properties": {
        "id": {"type": "integer", "minimum": -5, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3}},
        "required": ["id", "tags"]}}, "required": ["user"]},
    "numbers": {**OBJ, "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5, "multipleOf": 0.25},
                                      "n": {"type": "integer", "exclusiveMinimum": 0, "maximum": 99}},
                "required": ["x", "n"]},
    "unicode": {**OBJ, "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 5},
                                      "date": {"type": "string", "format": "date"}}, "required": ["word", "date"]},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def check(schema: dict, data: bytes) -> object:
    doc = json.loads(data.decode("utf-8"))  # strict UTF-8: a multi-byte character built byte by byte is whole
    jsonschema.validate(doc, schema, format_checker=jsonschema.FormatChecker())
    return doc


def run(model, params: list[SamplingParams], prompt: bytes = b"ab") -> list[tuple[bytes, str]]:
    """Each request's bytes and finish reason, all in one engine batch."""
    engine = Engine(model, max_streams=len(params))
    outs = [[] for _ in params]
    for p, o in zip(params, outs, strict=True):
        engine.submit(prompt, p, o.append)
    while any(not o or o[-1].finish_reason is None for o in outs):
        engine.step()
    return [(b"".join(x.data for x in o), o[-1].finish_reason) for o in outs]


def test_every_constrained_output_parses_and_validates(megabyte):
    """Several schemas x seeds x sampling settings, all in one engine at once (batched); every output ends by "stop"
    with a valid document, never sending the end byte."""
    engine = Engine(megabyte, max_streams=16)
    settings = [dict(temperature=1.0), dict(temperature=1.5, top_k=200), dict(temperature=0.7, top_p=0.9),
                dict(temperature=0)]
    outs, asked = [], []
    for name, schema in SCHEMAS.items():
        for seed, kw in enumerate(settings):
            params = SamplingParams(max_new_bytes=400, seed=seed, grammar=JsonSchema(schema), **kw)
            outs.append([])
            engine.submit(b'{"', params, outs[-1].append)
            asked.append(name)
    while any(not o or o[-1].finish_reason is None for o in outs):
        engine.step()
    for name, o in zip(asked, outs, strict=True):
        data = b"".join(x.data for x in o)
        assert o[-1].finish_reason == "stop", (name, data)
        check(SCHEMAS[name], data)
        assert bytes([END_BYTE]) not in data


def test_json_object_is_an_object_and_model_generate_takes_a_schema(megabyte):
    outs = run(megabyte, [SamplingParams(max_new_bytes=300, seed=s, grammar=JsonSchema()) for s in range(3)])
    for data, finish in outs:  # any JSON has unbounded strings: a random model's document may be cut by max_new_bytes
        assert finish == "length" or isinstance(json.loads(data), dict)
    assert any(finish == "stop" for _, finish in outs)
    schema = SCHEMAS["enum"]
    streamed = b"".join(megabyte.stream(b"x", 100, seed=3, json_schema=schema))
    assert streamed == megabyte.generate(b"x", 100, seed=3, json_schema=JsonSchema(schema))
    check(schema, streamed)
    with pytest.raises(GenerationError, match="one document"):
        megabyte.generate(torch.zeros(2, 3, dtype=torch.long), 10, json_schema=schema)


def test_unconstrained_rows_beside_constrained_ones_keep_their_bytes(megabyte):
    """Batched == alone holds for both kinds of row: the mask touches only the rows that have a grammar."""
    params = [SamplingParams(max_new_bytes=40, temperature=0.9, seed=1),
              SamplingParams(max_new_bytes=80, temperature=1.0, seed=2, grammar=JsonSchema(SCHEMAS["enum"])),
              SamplingParams(max_new_bytes=40, temperature=0),
              SamplingParams(max_new_bytes=80, temperature=1.0, seed=3, grammar=JsonSchema(SCHEMAS["flat"]))]
    together = run(megabyte, params)
    assert together == [run(megabyte, [p])[0] for p in params]
    assert [f for _, f in together] == ["length", "stop", "length", "stop"]


def test_logprobs_of_a_constrained_row_are_over_the_bytes_it_may_take(megabyte):
    engine = Engine(megabyte, max_streams=1)
    out = engine.generate(b"", SamplingParams(max_new_bytes=100, seed=0, logprobs=20,
                                              grammar=JsonSchema(SCHEMAS["enum"])))
    first = out.logprobs[0]
    assert (first.byte, first.logprob, first.top) == (ord("{"), 0.0, ((ord("{"), 0.0),))  # the only byte allowed
    assert len(out.logprobs) == len(out.data)
    for lp in out.logprobs:  # alternatives are bytes the grammar allowed: never -inf, and they sum to at most 1
        assert lp.top and all(v > float("-inf") for _, v in lp.top)
        assert sum(torch.tensor([v for _, v in lp.top]).exp()) <= 1 + 1e-5


def test_a_document_cut_by_max_new_bytes_finishes_by_length(megabyte):
    out = Engine(megabyte).generate(b"", SamplingParams(max_new_bytes=5, seed=0, grammar=JsonSchema(SCHEMAS["flat"])))
    assert (out.finish_reason, len(out.data)) == ("length", 5)
    assert out.data.startswith(b'{"')


@pytest.mark.parametrize("schema, says", [
    ({"type": "foo"}, "Invalid type"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "string", "pattern": "(?<=a)b"}, "look-around"),
    ("[1, 2]", "must be an object"),
    ("{not json", "not JSON"),
])
def test_a_schema_that_cannot_be_honoured_is_refused_before_any_work(megabyte, schema, says):
    engine = Engine(megabyte, max_streams=1)
    with pytest.raises(GenerationError, match=says):
        engine.submit(b"x", SamplingParams(grammar=JsonSchema(schema)), print)
    assert engine.queued == 0 and engine.stats["requests"] == 0


# --- the server ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from bytelm import Megabyte, MegabyteConfig
    from tests.test_serve import Server

    torch.manual_seed(0)
    folder = Megabyte(MegabyteConfig.from_name("tiny", max_seq_len=1024)).eval().save_pretrained(
        tmp_path_factory.mktemp("structured") / "tiny")
    s = Server(folder, "--max-streams", "8")
    s.model = str(folder)
    yield s
    s.kill()


def schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def test_openai_sdk_structured_outputs_parse_and_validate(server):
    """Chat and completions, streamed and not, several schemas and seeds, through the official client."""
    import concurrent.futures as cf

    client = server.client()
    messages = [{"role": "user", "content": "Describe a person as JSON."}]

    def one(name: str, seed: int, stream: bool, chat: bool) -> tuple[str | None, str]:
        kw = dict(model=server.model, max_tokens=400, temperature=1.0, seed=seed, stream=stream,
                  response_format=schema_format(name))
        if chat:
            r = client.chat.completions.create(messages=messages, **kw)
            if stream:
                r = list(r)
                return r[-1].choices[0].finish_reason, "".join(c.choices[0].delta.content or "" for c in r)
            return r.choices[0].finish_reason, r.choices[0].message.content
        r = client.completions.create(prompt="JSON: ", extra_body={"response_format": kw.pop("response_format")},
                                      **kw)
        if stream:
            r = list(r)
            return r[-1].choices[0].finish_reason, "".join(c.choices[0].text for c in r)
        return r.choices[0].finish_reason, r.choices[0].text

    jobs = [(name, seed, stream, chat) for name in SCHEMAS for seed, (stream, chat) in
            enumerate([(False, True), (True, True), (False, False), (True, False)])]
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda j: one(*j), jobs))
    for (name, *_), (finish, text) in zip(jobs, results, strict=True):
        assert finish == "stop", (name, text)
        check(SCHEMAS[name], text.encode())
    # json_object: an object (ended by "stop") or cut by max_tokens
    r = client.chat.completions.create(model=server.model, messages=messages, max_tokens=600, seed=1,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_openai_sdk_parse_with_a_pydantic_model(server):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=120)
        role: Literal["admin", "user"]

    client = server.client()
    for seed in range(2):
        r = client.beta.chat.completions.parse(model=server.model, messages=[{"role": "user", "content": "a person"}],
                                               max_tokens=300, seed=seed, response_format=Person)
        assert isinstance(r.choices[0].message.parsed, Person)


@pytest.mark.parametrize("fmt, says", [
    ({"type": "xml"}, "response_format"),
    ({"type": "json_schema"}, "json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, "Invalid type"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}, "not"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "name"),
])
def test_a_bad_response_format_is_a_400_naming_it(server, fmt, says):
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})):
        r = server.post(path, {**body, "response_format": fmt, "max_tokens": 5})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert says in err["message"] and "response_format" in (err["param"] or "") + err["message"]


def test_response_format_text_is_plain_generation(server):
    body = {"prompt": "hi", "max_tokens": 12, "temperature": 0}
    plain = server.post("/v1/completions", body).json()["choices"][0]["text"]
    text = server.post("/v1/completions", {**body, "response_format": {"type": "text"}}).json()
    assert text["choices"][0]["text"] == plain


def test_cli_generate_json_schema(megabyte, tmp_path, capsys):
    from bytelm.cli import main

    folder = megabyte.save_pretrained(tmp_path / "tiny")
    (tmp_path / "s.json").write_text(json.dumps(SCHEMAS["enum"]))
    assert main(["generate", str(folder), "--json-schema", str(tmp_path / "s.json"), "--seed", "1", "--no-echo",
                 "--device", "cpu"]) == 0
    check(SCHEMAS["enum"], capsys.readouterr().out.strip().encode())
    (tmp_path / "bad.json").write_text('{"type": "foo"}')
    assert main(["generate", str(folder), "--json-schema", str(tmp_path / "bad.json"), "--device", "cpu"]) == 2
    assert "Invalid type" in capsys.readouterr().err
