"""The server answers each refusal by the error's type, never by its message: a prompt over the context
(ContextLengthError) is a 400 `context_length_exceeded`, any other bad generation argument a plain 400, a full engine
a 429; an image's prompt rows (PromptRowsError) and a clip without samples (NoSamplesError) are 400s naming their
field. Each test raises the type with a message that says nothing of it, to show the type alone decides."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
sf = pytest.importorskip("soundfile")

from fastapi.testclient import TestClient  # noqa: E402

from bytelm import MegabyteConfig  # noqa: E402
from bytelm.errors import ContextLengthError, GenerationError, NoSamplesError, PromptRowsError  # noqa: E402
from bytelm.generation import check_request  # noqa: E402
from bytelm.generation.engine import Engine, EngineFull  # noqa: E402
from bytelm.models import build  # noqa: E402
from bytelm.serve import create_app  # noqa: E402
from bytelm.serve import media as served  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _engine(modality: str, max_seq_len: int) -> Engine:
    torch.manual_seed(0)
    model = build(MegabyteConfig.from_name("tiny", modality=modality, max_seq_len=max_seq_len)).eval()
    return Engine(model, max_streams=2, max_queue=2)


@pytest.fixture(scope="module")
def engine():
    return _engine("bytes", 64)


@pytest.fixture(scope="module")
def text(engine):
    with TestClient(create_app(engine, "m")) as c:
        yield c


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_check_request_raises_context_length_error_for_a_request_over_max_seq_len():
    model = SimpleNamespace(config=SimpleNamespace(max_seq_len=64))  # all check_request reads of a model
    with pytest.raises(ContextLengthError, match="exceeds this model's max_seq_len of 64"):
        check_request(model, 60, 5)
    check_request(model, 60, 4)  # exactly the context: fine


def test_a_request_over_the_context_is_the_same_400_as_ever(text):
    err = _error(text.post("/v1/completions", json={"prompt": "x" * 60, "max_tokens": 5}), 400)
    assert err["code"] == "context_length_exceeded" and "max_seq_len" in err["message"]
    err = _error(text.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 60}],
                                                           "max_tokens": 5}), 400)
    assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("raised, status, code", [
    (ContextLengthError("too long"), 400, "context_length_exceeded"),
    (GenerationError("max_seq_len is in this message but it is no context error"), 400, None),
    (EngineFull("busy"), 429, "server_busy"),
])
def test_an_engine_refusal_is_classified_by_its_type(text, engine, monkeypatch, raised, status, code):
    def refuse(*args, **kwargs):
        raise raised

    monkeypatch.setattr(engine, "submit", refuse)
    r = text.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    err = _error(r, status)
    assert err["code"] == code and err["message"] == str(raised)
    if status == 429:
        assert r.headers["retry-after"] == "1"


def test_prompt_rows_are_named_by_the_errors_type(monkeypatch):
    fmt = MegabyteConfig.from_name("tiny", modality="image:6x4x3").media
    body = served.ImageGenerationRequest(image=base64.b64encode(b"any").decode(), prompt_rows=2)

    def refuse(cls):
        def top_rows_of(*args, **kwargs):
            raise cls("a message naming no field")
        return top_rows_of

    monkeypatch.setattr(served.image_data, "top_rows_of", refuse(PromptRowsError))
    with pytest.raises(served.ApiError) as e:
        served.image_prompt(body, fmt)
    assert e.value.status == 400 and e.value.body["error"]["param"] == "prompt_rows"
    monkeypatch.setattr(served.image_data, "top_rows_of", refuse(served.DataError))
    with pytest.raises(served.ApiError) as e:
        served.image_prompt(body, fmt)
    assert e.value.body["error"]["param"] == "image"


def test_a_clip_without_samples_is_a_400_saying_so():
    buf = io.BytesIO()
    sf.write(buf, np.zeros(0, dtype="int16"), 8000, format="WAV", subtype="PCM_16")
    with TestClient(create_app(_engine("audio:8000:pcm16", 256), "m")) as c:
        r = c.post("/v1/audio/generations", json={"audio": base64.b64encode(buf.getvalue()).decode(),
                                                   "max_bytes": 4})
    err = _error(r, 400)
    assert err["param"] == "audio" and err["message"].endswith("it holds no samples")


def test_no_samples_is_told_by_the_errors_type(monkeypatch):
    fmt = MegabyteConfig.from_name("tiny", modality="audio:8000:pcm16").media
    body = served.AudioGenerationRequest(audio=base64.b64encode(b"any").decode(), max_bytes=4)

    def empty(*args, **kwargs):
        raise NoSamplesError("a message that says nothing of samples")

    monkeypatch.setattr(served.audio_data, "wav_to_bytes", empty)
    with pytest.raises(served.ApiError) as e:
        served.audio_request(body, fmt, 256)
    assert e.value.body["error"]["param"] == "audio" and str(e.value).endswith("it holds no samples")
