"""Image and audio models behind the server: OpenAI's POST /v1/images/generations (PNG, as `b64_json`) and bytelm's
POST /v1/audio/generations (WAV). Most tests drive the app in-process (Starlette's TestClient runs its lifespan, so
the engine's thread runs as under uvicorn), the official `openai` client on top of it; one runs `bytelm serve` as a
user does. Models are tiny and untrained: 6 rows of 4 RGB pixels (72 bytes), 8 kHz pcm16 sound."""

import base64
import io

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
Image = pytest.importorskip("PIL.Image")
sf = pytest.importorskip("soundfile")

from fastapi.testclient import TestClient  # noqa: E402

from bytelm import MegabyteConfig  # noqa: E402
from bytelm.data import AudioFormat  # noqa: E402
from bytelm.data import audio as audio_data  # noqa: E402
from bytelm.generation.engine import Engine  # noqa: E402
from bytelm.models import build  # noqa: E402
from bytelm.serve import create_app  # noqa: E402

KEY = "sk-media"
H, W, C = 6, 4, 3  # OpenAI's size is WIDTHxHEIGHT: "4x6"
SIZE = f"{W}x{H}"
AUDIO = AudioFormat(8000, "pcm16")


def _model(modality: str, max_seq_len: int, nan: bool = False):
    torch.manual_seed(0)
    model = build(MegabyteConfig.from_name("tiny", modality=modality, max_seq_len=max_seq_len)).eval()
    if nan:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
    return model


def _client(model, name: str, **engine):
    return TestClient(create_app(Engine(model, **{"max_streams": 4, "max_queue": 4, **engine}), name, KEY),
                      headers={"Authorization": f"Bearer {KEY}"})


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def image_model():
    return _model(f"image:{H}x{W}x{C}", H * W * C)


@pytest.fixture(scope="module")
def images(image_model):
    with _client(image_model, "img") as c:
        yield c


@pytest.fixture(scope="module")
def sounds():
    with _client(_model(AUDIO.spec, 256), "snd") as c:
        yield c


@pytest.fixture(scope="module")
def text():
    with _client(_model("bytes", 256), "txt") as c:
        yield c


def _png(b64: str):
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return img


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(_png(b64))


def _b64_png(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "\n" not in err["message"]  # one line
    return err


def test_openai_client_gets_pngs_of_the_models_size_and_mode(images):
    client = openai.OpenAI(base_url=str(images.base_url) + "/v1", api_key=KEY, http_client=images, max_retries=0)
    out = client.images.generate(model="img", prompt="", n=2, size=SIZE, response_format="b64_json")
    assert len(out.data) == 2 and out.created > 0
    for item in out.data:
        img = _png(item.b64_json)
        assert img.size == (W, H) and img.mode == "RGB"
    assert out.usage.output_tokens == 2 * H * W * C
    models = client.models.list().data
    assert models[0].id == "img" and models[0].model_extra["modality"] == f"image:{H}x{W}x{C}"


def test_seeded_images_are_reproducible_and_batched_equals_alone(images, image_model):
    batch = images.post("/v1/images/generations", json={"n": 3, "seed": 40, "temperature": 1.0}).json()["data"]
    assert [d["seed"] for d in batch] == [40, 41, 42]
    alone = [images.post("/v1/images/generations", json={"seed": s}).json()["data"][0] for s in (40, 42)]
    assert alone[0]["b64_json"] == batch[0]["b64_json"] and alone[1]["b64_json"] == batch[2]["b64_json"]
    assert batch[0]["b64_json"] != batch[1]["b64_json"]
    want = image_model.generate(b"", H * W * C, temperature=1.0, seed=41)  # the engine is exact
    assert _pixels(batch[1]["b64_json"]).tobytes() == want
    unseeded = images.post("/v1/images/generations", json={"n": 2}).json()["data"]
    again = images.post("/v1/images/generations", json={"seed": unseeded[1]["seed"]}).json()["data"][0]
    assert again["b64_json"] == unseeded[1]["b64_json"]  # each image's reported seed makes it again


def test_completion_keeps_the_given_top_rows_exactly(images):
    rng = np.random.default_rng(0)
    full = rng.integers(0, 256, (H, W, C), dtype=np.uint8)
    out = images.post("/v1/images/generations", json={"image": _b64_png(full), "prompt_rows": 2, "n": 2,
                                                      "seed": 1}).json()
    for item in out["data"]:
        got = _pixels(item["b64_json"])
        assert got.shape == (H, W, C) and (got[:2] == full[:2]).all()
    assert out["usage"]["input_tokens"] == 2 * 2 * W * C
    top = full[:3, :, 0]  # a grey image of 3 rows: all 3 kept (as RGB), sent as a data URL
    url = "data:image/png;base64," + _b64_png(top)
    got = _pixels(images.post("/v1/images/generations", json={"image": url}).json()["data"][0]["b64_json"])
    assert (got[:3] == np.repeat(top[..., None], 3, axis=2)).all()


def _wide_png() -> str:
    return _b64_png(np.zeros((2, W + 1, C), np.uint8))


@pytest.mark.parametrize("body, status, param, fragment", [
    ({"prompt": "a red cat"}, 400, "prompt", "not text-conditioned"),
    ({"size": "6x4"}, 400, "size", "this model makes 4x6 images"),
    ({"size": "1024x1024"}, 400, "size", "send size '4x6'"),
    ({"response_format": "url"}, 400, "response_format", "'url' is not supported"),
    ({"image": "not base64!"}, 400, "image", "not valid base64"),
    ({"image": base64.b64encode(b"no image here").decode()}, 400, "image", "cannot read the image: cannot identify"),
    ({"image": "wide"}, 400, "image", "must be 4 pixels wide"),
    ({"prompt_rows": 2}, 400, "prompt_rows", "send the image"),
    ({"image": "tall", "prompt_rows": 6}, 400, "prompt_rows", "prompt_rows must be in 1..5"),
    ({"n": 11}, 400, "n", "n:"),
    ({"n": 9}, 400, "n", "at most 8 streams"),
    ({"seed": -1}, 400, "seed", "seed:"),
    ({"stream": True}, 400, "stream", "not supported"),
    ({"quality": "hd"}, 400, "quality", "not supported"),
    ({"output_format": "jpeg"}, 400, "output_format", "output_format"),
    ({"model": "dall-e-3"}, 404, "model", "not served here"),
])
def test_bad_image_requests_get_one_line_400s(images, body, status, param, fragment):
    if body.get("image") == "wide":
        body = {**body, "image": _wide_png()}
    if body.get("image") == "tall":
        body = {**body, "image": _b64_png(np.zeros((H, W, C), np.uint8))}
    err = _error(images.post("/v1/images/generations", json=body), status)
    assert fragment in err["message"] and err["param"] == param
    assert images.post("/v1/images/generations", json={}).status_code == 200  # and it goes on serving


def test_the_api_key_is_checked(images):
    r = images.post("/v1/images/generations", json={}, headers={"Authorization": "Bearer wrong"})
    assert _error(r, 401)["code"] == "invalid_api_key"


def test_each_endpoint_refuses_a_model_that_makes_something_else(images, text, sounds):
    err = _error(text.post("/v1/images/generations", json={}), 400)
    assert "not images" in err["message"] and "/v1/completions" in err["message"] and "0x" not in err["message"]
    assert err["code"] == "unsupported_modality" and err["param"] == "model"
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions",
                                                             {"messages": [{"role": "user", "content": "x"}]})):
        err = _error(images.post(path, json=body), 400)
        assert "pixels" in err["message"] and "/v1/images/generations" in err["message"]
    assert "/v1/audio/generations" in _error(sounds.post("/v1/images/generations", json={}), 400)["message"]
    assert "/v1/images/generations" in _error(images.post("/v1/audio/generations", json={}), 400)["message"]
    assert text.get("/v1/models").json()["data"][0]["modality"] == "bytes"


def test_n_images_are_admitted_all_or_none():
    """One stream running and room for one more: n=2 gets a 429 with Retry-After, and the one of its two that was
    queued is withdrawn (the queue is empty again), not left to decode for nobody."""
    import threading
    import time

    with _client(_model("image:16x16x1", 256), "one", max_streams=1, max_queue=1) as c:
        running = threading.Thread(target=c.post, args=("/v1/images/generations",), kwargs={"json": {}})
        running.start()
        deadline = time.monotonic() + 30
        while c.get("/health").json()["active_streams"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.post("/v1/images/generations", json={"n": 2})
        running.join()
        err = _error(r, 429)
        assert err["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
        assert c.get("/health").json() == {"status": "ok", "active_streams": 0, "queue_length": 0}
        assert "bytelm_generated_bytes_total 256.0" in c.get("/metrics").text  # the running image's bytes only
        assert c.post("/v1/images/generations", json={"n": 2}).status_code == 200


def test_a_failed_generation_is_an_error_never_a_partial_image():
    """A model whose logits are NaN: a 500 with the engine's reason, no image, and the server serves on."""
    with _client(_model(f"image:{H}x{W}x{C}", H * W * C, nan=True), "nan") as c:
        err = _error(c.post("/v1/images/generations", json={"n": 3}), 500)
        assert err["type"] == "server_error" and "not finite" in err["message"]
        assert _error(c.post("/v1/images/generations", json={}), 500)["type"] == "server_error"
        assert c.get("/health").json()["active_streams"] == 0
        assert 'bytelm_requests_total{code="500",endpoint="/v1/images/generations"} 2.0' in c.get("/metrics").text


def _wav(b64: str):
    blob = base64.b64decode(b64)
    return sf.info(io.BytesIO(blob)), sf.read(io.BytesIO(blob), dtype="int16")[0]


def test_audio_is_a_wav_of_the_models_rate_and_subtype(sounds):
    out = sounds.post("/v1/audio/generations", json={"seconds": 0.01, "n": 2, "seed": 3}).json()
    assert out["sample_rate"] == 8000 and out["sample_format"] == "pcm16" and out["output_format"] == "wav"
    for item in out["data"]:
        info, samples = _wav(item["b64_json"])
        assert (info.samplerate, info.channels, info.subtype, info.format) == (8000, 1, "PCM_16", "WAV")
        assert len(samples) == 80
    alone = sounds.post("/v1/audio/generations", json={"seconds": 0.01, "seed": 4}).json()["data"][0]
    assert alone["b64_json"] == out["data"][1]["b64_json"]  # batched equals alone
    default = sounds.post("/v1/audio/generations", json={}).json()["data"][0]
    assert len(_wav(default["b64_json"])[1]) == 128  # 1 s does not fit a 256-byte context: all it holds


def test_audio_continues_a_clip(sounds):
    clip = (np.sin(np.arange(40) / 3) * 8000).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, clip, 8000, format="WAV", subtype="PCM_16")
    sent = base64.b64encode(buf.getvalue()).decode()
    got = _wav(sounds.post("/v1/audio/generations", json={"audio": sent, "max_bytes": 20}).json()["data"][0]
               ["b64_json"])[1]
    assert len(got) == 50 and (got[:40] == clip).all()  # the prompt clip, exactly, then 10 new samples
    bare = _wav(sounds.post("/v1/audio/generations", json={"audio": sent, "max_bytes": 20, "echo": False})
                .json()["data"][0]["b64_json"])[1]
    assert len(bare) == 10
    long = np.tile(clip, 10)  # 400 samples, 800 bytes: more than the context; the model reads its end
    buf = io.BytesIO()
    sf.write(buf, long, 8000, format="WAV", subtype="PCM_16")
    out = sounds.post("/v1/audio/generations", json={"audio": base64.b64encode(buf.getvalue()).decode(),
                                                     "max_bytes": 56})
    assert out.status_code == 200 and out.json()["usage"]["input_tokens"] == 200
    assert audio_data.decode(audio_data.encode(clip / 32768.0, AUDIO), AUDIO).tolist() == clip.tolist()


@pytest.mark.parametrize("body, param, fragment", [
    ({"prompt": "birdsong"}, "prompt", "not text-conditioned"),
    ({"audio": "%%%"}, "audio", "not valid base64"),
    ({"audio": base64.b64encode(b"RIFF....nonsense").decode()}, "audio", "sound file (WAV, FLAC, OGG, ...): Format"),
    ({"seconds": 1, "max_bytes": 2}, "seconds", "not both"),
    ({"seconds": 1}, "seconds", "do not fit this model's context of 256 bytes"),
    ({"max_bytes": 3}, "max_bytes", "not a whole number"),
    ({"seconds": 0.00001}, "seconds", "less than one sample"),
    ({"response_format": "url"}, "response_format", "hosts no files"),
    ({"output_format": "mp3"}, "output_format", "output_format"),
])
def test_bad_audio_requests_get_one_line_400s(sounds, body, param, fragment):
    err = _error(sounds.post("/v1/audio/generations", json=body), 400)
    assert fragment in err["message"] and err["param"] == param


def test_bytelm_serve_serves_an_image_model_and_a_hang_up_frees_its_streams(tmp_path):
    """The CLI path: `bytelm serve` on a saved 32x32 grey model, the openai client against a real socket (completing
    all but the last two rows, so that it is quick); then a client that asks for 3 whole images and hangs up: its 3
    streams are cancelled at once, not decoded to the end."""
    import httpx
    from test_serve import KEY as SERVE_KEY
    from test_serve import Server, _generated, _wait

    folder = _model("image:32x32x1", 1024).save_pretrained(tmp_path / "img")
    s = Server(folder)
    try:
        top = np.random.default_rng(1).integers(0, 256, (30, 32), dtype=np.uint8)
        out = s.client().images.generate(model=str(folder), prompt="", size="32x32",
                                         extra_body={"seed": 2, "image": _b64_png(top)})
        img = _png(out.data[0].b64_json)
        assert img.size == (32, 32) and img.mode == "L" and (np.asarray(img)[:30] == top).all()
        assert 'bytelm_requests_total{code="200",endpoint="/v1/images/generations"} 1.0' in \
            httpx.get(s.url + "/metrics").text
        before = _generated(s)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/images/generations", json={"n": 3}, timeout=2,
                       headers={"Authorization": f"Bearer {SERVE_KEY}"})
        _wait(s, lambda h: h["active_streams"] == 0 and h["queue_length"] == 0)
        assert _generated(s) - before < 3 * 1024
    finally:
        s.kill()
