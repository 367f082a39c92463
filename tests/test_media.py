"""Images and audio end to end: exact round trips, one image per sequence, windows inside one clip, causality on
pixels, train -> eval -> generate through the CLI, and one clear line for every kind of bad input.

Every test makes its own small images and sounds (Pillow, soundfile); no data set is read."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from bytelm import Megabyte, MegabyteConfig, load
from bytelm.cli import main
from bytelm.data import (
    AudioFormat,
    ByteDataset,
    ImageFormat,
    WindowSampler,
    audio,
    files,
    images,
    load_split,
    parse_modality,
    resolve_media,
)
from bytelm.errors import ConfigError, DataError
from bytelm.evaluation import codec_bpb, evaluate


def one_line_error(capsys, argv, message) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert message in last, err
    assert last.startswith(f"bytelm {argv[0]}: error: ") and "Traceback" not in err, err


def _image(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """A picture with structure (a gradient, a bar) and noise, so a PNG of it is not trivial."""
    rng = np.random.default_rng(seed)
    base = (np.arange(h)[:, None, None] * 7 + np.arange(w)[None, :, None] * 3 + np.arange(c) * 40) % 256
    img = (base + rng.integers(0, 30, (h, w, c))).astype(np.uint8)
    img[seed % h] = 255
    return img


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr, images.MODES[arr.shape[2]]).save(path)
    return path


def _tone(n: int, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    return 0.4 * np.sin(2 * np.pi * (220 + 40 * seed) * t) + 0.05 * rng.normal(size=n)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i in range(16):
        _save(root / f"img{i:02d}.png", _image(8, 8, 3, i))
    return root


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    for i in range(5):
        sf.write(root / f"clip{i}.wav", _tone(4000, 8000, i), 8000, subtype="PCM_16")
    return root


# --- round trips -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 7, 1), (6, 4, 2), (3, 9, 3), (8, 8, 4)])
def test_image_to_bytes_to_png_round_trip_is_exact(tmp_path, shape):
    arr = _image(*shape, seed=3)
    fmt = ImageFormat(*shape)
    path = _save(tmp_path / "x.png", arr)
    (pixels,) = images.read_images(path, *resolve_media([path]), "none")
    assert pixels.tobytes() == arr.tobytes()  # row-major, a pixel's channels together
    png = files.to_file(pixels.tobytes(), fmt)
    back = np.asarray(Image.open(io.BytesIO(png)))
    assert back.reshape(-1).tobytes() == arr.tobytes()
    assert files.from_file(png, fmt, "x") == arr.tobytes()


@pytest.mark.parametrize("sample_format,subtype", [("mulaw", "ULAW"), ("pcm8", "PCM_U8"), ("pcm16", "PCM_16")])
def test_audio_to_bytes_to_wav_round_trip_is_exact(tmp_path, sample_format, subtype):
    fmt = AudioFormat(8000, sample_format)
    path = tmp_path / "x.wav"
    sf.write(path, _tone(3001, 8000, 1), 8000, subtype="PCM_16")
    data = audio.read_audio(path, fmt)
    assert len(data) == 3001 * fmt.bytes_per_sample
    wav = files.to_file(data.tobytes(), fmt)
    (tmp_path / "y.wav").write_bytes(wav)
    info = sf.info(tmp_path / "y.wav")
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (8000, 1, subtype, 3001)
    assert files.from_file(wav, fmt, "y") == data.tobytes()
    if sample_format == "pcm16":  # 16-bit in, 16-bit out: the very samples of the file
        pcm, _ = sf.read(path, dtype="int16")
        assert data.tobytes() == pcm.astype("<i2").tobytes()


def test_mulaw_writes_one_code_for_silence():
    """G.711 has two codes for 0; bytelm's data holds only 0xFF, so its bytes -> WAV -> bytes is exact."""
    fmt = AudioFormat(8000, "mulaw")
    data = audio.encode(np.array([0.0, -1e-9, 1e-9, -0.5, 0.5]), fmt)
    assert 0x7F not in data.tolist() and data[0] == 0xFF
    every = np.arange(256, dtype=np.uint8)
    back = np.frombuffer(files.from_file(files.to_file(every.tobytes(), fmt), fmt, "x"), np.uint8)
    assert np.nonzero(back != every)[0].tolist() == [0x7F]


def test_audio_is_mixed_to_mono_and_resampled_when_the_rate_is_stated(tmp_path):
    stereo = np.stack([_tone(4410, 44100, 1), _tone(4410, 44100, 1)], axis=1)
    sf.write(tmp_path / "s.wav", stereo, 44100, subtype="PCM_16")
    media, stated = resolve_media([tmp_path], sample_rate=8000)
    assert stated and media == AudioFormat(8000, "mulaw")
    assert len(audio.read_audio(tmp_path / "s.wav", media)) == 800  # 0.1 s at 8 kHz


# --- sequences ---------------------------------------------------------------------------------------------------
def test_a_batch_never_puts_two_images_in_one_sequence():
    fmt = ImageFormat(4, 4, 3)
    parts = [np.full(fmt.seq_len, i, np.uint8) for i in range(10)]  # image i is all i
    ds = ByteDataset(parts, media=fmt)
    batch = WindowSampler(ds, fmt.seq_len, 64, seed=0).next_batch()
    for row in batch:
        assert len(set(row.tolist())) == 1  # one image, whole
    assert len({int(r[0]) for r in batch}) > 5  # and drawn from many


def test_audio_windows_stay_inside_one_clip_and_start_on_a_sample():
    fmt = AudioFormat(8000, "pcm16")
    parts = [np.full(2 * n, i, np.uint8) for i, n in enumerate([5, 40, 3, 60])]  # clip i is all i
    ds = ByteDataset(parts, media=fmt)
    sampler = WindowSampler(ds, 16, 256, seed=1)
    assert sampler.skipped == 2  # clips 0 and 2 are shorter than a window
    starts = sampler._bounded_starts(np.arange(sampler._ends[-1]))
    assert (starts % 2 == 0).all()
    for row in sampler.next_batch():
        assert len(set(row.tolist())) == 1 and int(row[0]) in (1, 3)


def test_bounded_sampler_resumes_exactly():
    fmt = ImageFormat(2, 2, 1)
    ds = ByteDataset([np.full(4, i, np.uint8) for i in range(50)], media=fmt)
    a = WindowSampler(ds, 4, 8, seed=3)
    a.next_batch()
    b = WindowSampler(ds, 4, 8, seed=99)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert torch.equal(a.next_batch(), b.next_batch())


def test_causality_holds_on_image_sequences(image_dir):
    media, _ = resolve_media([image_dir])
    train, _, _ = load_split([image_dir], 0.2, media=media)
    x = WindowSampler(train, media.seq_len, 2, seed=0).next_batch()
    torch.manual_seed(0)
    model = Megabyte(MegabyteConfig.from_name("tiny", modality=media.spec, max_seq_len=media.seq_len)).eval()
    for k in (0, 37, media.row_bytes, media.seq_len - 2):
        y = x.clone()
        y[:, k] = (y[:, k] + 101) % 256
        a, b = model(x), model(y)
        assert torch.equal(a[:, : k + 1], b[:, : k + 1]), f"pixel byte {k} influenced an earlier prediction"
        assert not torch.allclose(a[:, k + 1:], b[:, k + 1:])


def test_eval_scores_each_image_from_nothing(image_dir):
    """An image dataset's bits per byte is the mean over whole images, each scored as one sequence: windows never
    cross into the next image, even with windows (seq_len) longer than an image would allow in a stream."""
    media, _ = resolve_media([image_dir])
    ds = load_split([image_dir], 0.2, media=media)[0]
    torch.manual_seed(0)
    model = Megabyte(MegabyteConfig.from_name("tiny", modality=media.spec)).eval()
    x = torch.from_numpy(np.stack(ds.parts)).long()
    with torch.no_grad():
        expected = model.loss(x, reduction="sum").item() / (math.log(2) * x.numel())
    res = evaluate(model, ds, seq_len=media.seq_len, batch_size=3)
    assert res.bytes == x.numel() and res.bpb == pytest.approx(expected, rel=1e-5)
    stream = evaluate(model, ByteDataset(ds.parts), seq_len=3 * media.seq_len, batch_size=3)  # no boundaries
    assert stream.bpb != pytest.approx(expected, rel=1e-4)


def test_codec_reference_is_the_files_a_person_would_store(image_dir):
    media, _ = resolve_media([image_dir])
    ds = load_split([image_dir], 0.2, media=media)[0]
    out = codec_bpb(ds)
    png = sum(len(images.pixels_to_png(p, media, optimize=True)) for p in ds.parts)
    assert out["png"] == pytest.approx(8 * png / len(ds))
    assert set(out) >= {"png", "xz"} and all(0 < v < 16 for v in out.values())


# --- the modality in configs and data ------------------------------------------------------------------------------
def test_modality_specs_round_trip_and_bad_ones_are_named():
    for spec in ("bytes", "image:64x64x3", "audio:16000:mulaw", "audio:8000:pcm16"):
        media = parse_modality(spec)
        assert (media.spec if media else "bytes") == spec
    for bad in ("image:64x64", "image:4x4x5", "audio:16000:mp3", "video"):
        with pytest.raises(ConfigError):
            parse_modality(bad)
    with pytest.raises(ConfigError, match="must hold a whole 64x64x3 image"):
        MegabyteConfig.from_name("tiny", modality="image:64x64x3")


def test_a_config_written_before_modality_loads_as_bytes():
    d = MegabyteConfig.from_name("tiny").to_dict()
    del d["modality"]
    assert MegabyteConfig.from_dict({**d, "bytelm_version": "0.4.0"}, saved=True).media is None
    with pytest.raises(ConfigError, match="lacks field"):
        MegabyteConfig.from_dict({**d, "bytelm_version": "0.5.0"}, saved=True)


def test_npy_stacks_are_images_and_split_by_their_tail(tmp_path):
    stack = np.stack([_image(6, 5, 1, i)[..., 0] for i in range(20)])
    np.save(tmp_path / "s.npy", stack)
    media, _ = resolve_media([tmp_path / "s.npy"])
    assert media == ImageFormat(6, 5, 1)
    train, val, text = load_split([tmp_path / "s.npy"], 0.1, media=media)
    assert [p.tobytes() for p in val.parts] == [a.tobytes() for a in stack[-2:]]
    assert train.num_files == 18 and "last 2 images" in text


def test_stated_size_and_fit_bring_mixed_images_to_size(tmp_path):
    _save(tmp_path / "a.png", _image(8, 8, 3, 0))
    _save(tmp_path / "b.png", _image(12, 6, 1, 1))
    media, stated = resolve_media([tmp_path], image_size="4x4x3")
    assert stated and media == ImageFormat(4, 4, 3)
    for fit in ("resize", "crop", "pad"):
        train, val, _ = load_split([tmp_path], 0.5, media=media, fit=fit, convert=True)
        assert all(len(p) == 48 for p in train.parts + val.parts)


@pytest.mark.parametrize("setup,argv,message", [
    ("corrupt_png", [], "cannot read image"),
    ("truncated_png", [], "cannot read image"),
    ("corrupt_wav", [], "cannot read audio"),
    ("mixed_sizes", [], "not 8x8 like the other images: state the size with --image-size"),
    ("mixed_channels", [], "has 1 channel(s) where the images have 3"),
    ("mixed_rates", [], "where the other clips are at 8,000 Hz: state the rate"),
    ("mixed_kinds", [], "the data mixes kinds of files"),
    ("float_npy", [], "an image array must be uint8"),
    ("sixteen_bit", [], "16-bit or floating point"),
    ("one_image", [], "holds one image"),
    ("images", ["--seq-len", "64"], "an image model trains on whole images: seq_len must be 192"),
    ("images", ["--image-size", "8"], "image size must be HEIGHTxWIDTH"),
    ("images", ["--image-fit", "stretch"], "image_fit must be one of"),
    ("images", ["--separator", "10"], "--separator joins documents of bytes"),
    ("images", ["--modality", "audio"], "cannot read audio"),
    ("clips", ["--sample-format", "mp3"], "sample_format must be one of"),
    ("clips", ["--sample-format", "pcm16", "--seq-len", "33"], "not a whole number of pcm16 samples"),
    ("clips", ["--seq-len", "9000", "--model", "max_seq_len=9000"], "no audio of the train data holds one window"),
    ("none", ["--modality", "image"], "a image model needs its data"),
])
def test_bad_media_data_is_one_line(capsys, tmp_path, image_dir, clip_dir, setup, argv, message):
    d = tmp_path / "d"
    d.mkdir()
    if setup == "images":
        d = image_dir
    elif setup == "clips":
        d = clip_dir
    elif setup == "corrupt_png":
        _save(d / "a.png", _image(8, 8, 3, 0))
        (d / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    elif setup == "truncated_png":
        _save(d / "a.png", _image(8, 8, 3, 0))
        good = _save(tmp_path / "big.png", _image(64, 64, 3, 1)).read_bytes()
        (d / "b.png").write_bytes(good[: len(good) // 2])
    elif setup == "corrupt_wav":
        sf.write(d / "a.wav", _tone(800, 8000, 0), 8000)
        (d / "b.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    elif setup == "mixed_sizes":
        _save(d / "a.png", _image(8, 8, 3, 0))
        _save(d / "b.png", _image(9, 8, 3, 1))
    elif setup == "mixed_channels":
        _save(d / "a.png", _image(8, 8, 3, 0))
        _save(d / "b.png", _image(8, 8, 1, 1))
    elif setup == "mixed_rates":
        sf.write(d / "a.wav", _tone(800, 8000, 0), 8000)
        sf.write(d / "b.wav", _tone(800, 16000, 0), 16000)
    elif setup == "mixed_kinds":
        _save(d / "a.png", _image(8, 8, 3, 0))
        sf.write(d / "b.wav", _tone(800, 8000, 0), 8000)
        (d / "c.txt").write_text("hello")
    elif setup == "float_npy":
        np.save(d / "a.npy", np.zeros((3, 4, 4), np.float32))
    elif setup == "sixteen_bit":
        Image.fromarray(np.zeros((8, 8), np.uint16) + 300).save(d / "a.png")
        _save(d / "b.png", _image(8, 8, 1, 1))
    elif setup == "one_image":
        np.save(d / "a.npy", np.zeros((1, 4, 4), np.uint8))
    data = [] if setup == "none" else ["--data", str(d)]
    one_line_error(capsys, ["train", *data, "--preset", "tiny", "--max-steps", "1", "--out-dir",
                            str(tmp_path / "run"), "--sample-bytes", "0", *argv], message)


def test_an_image_run_is_sized_before_its_images_are_decoded(capsys, tmp_path):
    """The memory check needs the image size, which the first image's header gives; the rest are decoded only after
    it (a corrupt second image is never reached by a run that cannot fit)."""
    _save(tmp_path / "d" / "a.png", _image(8, 8, 3, 0))
    (tmp_path / "d" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\ncorrupt")
    argv = ["train", "--data", str(tmp_path / "d"), "--preset", "tiny", "--out-dir", str(tmp_path / "run")]
    one_line_error(capsys, [*argv, "--batch-size", "100000000000"], "activations")
    one_line_error(capsys, argv, "cannot read image")


# --- train -> eval -> generate, through the CLI -----------------------------------------------------------------
@pytest.fixture(scope="module")
def image_run(tmp_path_factory, image_dir) -> Path:
    out = tmp_path_factory.mktemp("runs") / "img"
    assert main(["train", "--data", str(image_dir), "--preset", "tiny", "--max-steps", "3", "--batch-size", "4",
                 "--eval-interval", "3", "--eval-batches", "1", "--out-dir", str(out), "--seed", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory, clip_dir) -> Path:
    out = tmp_path_factory.mktemp("runs") / "aud"
    assert main(["train", "--data", str(clip_dir), "--preset", "tiny", "--max-steps", "2", "--batch-size", "2",
                 "--seq-len", "256", "--model", "max_seq_len=512", "--eval-interval", "2", "--eval-batches", "1",
                 "--out-dir", str(out), "--sample-bytes", "1"]) == 0
    return out


def test_an_image_run_records_its_modality_and_writes_a_sample_png(image_run):
    run = json.loads((image_run / "run.json").read_text())
    assert run["model"]["modality"] == "image:8x8x3" and run["model"]["max_seq_len"] == 192
    assert run["seq_len"] == 192 and "8x8 RGB images" in run["data"]
    assert load(image_run).config.media == ImageFormat(8, 8, 3)
    img = Image.open(image_run / "sample.png")
    assert (img.size, img.mode) == ((8, 8), "RGB")


def test_eval_of_an_image_model_reports_bits_per_pixel_and_codecs(capsys, image_run):
    assert main(["eval", str(image_run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["seq_len"] == 192 and res["bytes"] % 192 == 0
    assert res["bits_per_pixel"] == pytest.approx(3 * res["bpb"])
    assert res["modality"] == "image:8x8x3" and {"png", "xz"} <= set(res["codecs_bpb"])
    assert main(["eval", str(image_run)]) == 0
    text = capsys.readouterr().out
    assert "bits per pixel:" in text and "lossless codecs on the same bytes (bits per byte): png" in text


def test_generate_writes_a_png_of_the_model_shape(tmp_path, capsys, image_run, image_dir):
    out = tmp_path / "g.png"
    assert main(["generate", str(image_run), "--out", str(out), "--seed", "1"]) == 0
    img = Image.open(out)
    assert (img.size, img.mode) == ((8, 8), "RGB")
    # completing the top 3 rows of an image keeps them exactly
    src = image_dir / "img05.png"
    out2 = tmp_path / "c.png"
    assert main(["generate", str(image_run), "--out", str(out2), "--prompt-image", str(src), "--prompt-rows", "3",
                 "--seed", "1"]) == 0
    assert np.array_equal(np.asarray(Image.open(out2))[:3], np.asarray(Image.open(src))[:3])
    # a seeded generation is reproducible
    out3 = tmp_path / "g3.png"
    assert main(["generate", str(image_run), "--out", str(out3), "--seed", "1"]) == 0
    assert out3.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "a cat", "--out", "{tmp}/x.png"], "this is an image model (8x8 RGB images"),
    (["--prompt-file", "{tmp}/p.bin", "--out", "{tmp}/x.png"], "a text or byte prompt cannot condition it"),
    (["--out", "{tmp}/x.jpg"], "writes a PNG file: name it with --out FILE.png"),
    ([], "writes a PNG file"),
    (["--out", "{tmp}/x.png", "--max-bytes", "10"], "generates the rest of its image (192 bytes here)"),
    (["--out", "{tmp}/x.png", "--prompt-image", "{tmp}/wide.png"], "must be 8 pixels wide"),
    (["--out", "{tmp}/x.png", "--prompt-image", "{tmp}/bad.png"], "cannot read image"),
    (["--out", "{tmp}/x.png", "--prompt-rows", "2"], "give the image whose rows to keep with --prompt-image"),
    (["--out", "{tmp}/x.png", "--prompt-audio", "{tmp}/p.bin"], "this is an image model"),
    (["--out", "{tmp}/x.png", "--stop", "x"], "output is not text"),
])
def test_bad_generate_requests_to_an_image_model_are_one_line(capsys, tmp_path, image_run, argv, message):
    (tmp_path / "p.bin").write_bytes(b"\x00\x01")
    _save(tmp_path / "wide.png", _image(4, 9, 3, 0))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    one_line_error(capsys, ["generate", str(image_run), *argv], message)
    assert not (tmp_path / "x.png").exists()


def test_audio_run_eval_and_generate(tmp_path, capsys, audio_run, clip_dir):
    model = load(audio_run)
    assert model.config.modality == "audio:8000:mulaw"
    assert sf.info(audio_run / "sample.wav").samplerate == 8000
    assert main(["eval", str(audio_run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bits_per_sample"] == pytest.approx(res["bpb"]) and "xz" in res["codecs_bpb"]
    out = tmp_path / "g.wav"
    assert main(["generate", str(audio_run), "--out", str(out), "--seconds", "0.05", "--seed", "0"]) == 0
    info = sf.info(out)
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (8000, 1, "ULAW", 400)
    # continuing a clip: the WAV starts with the clip (as the model's format), then 100 new samples
    out2 = tmp_path / "c.wav"
    assert main(["generate", str(audio_run), "--out", str(out2), "--prompt-audio", str(clip_dir / "clip1.wav"),
                 "--max-bytes", "100", "--seed", "0"]) == 0
    fmt = AudioFormat(8000, "mulaw")
    written = files.from_file(out2.read_bytes(), fmt, "c")
    clip = audio.read_audio(clip_dir / "clip1.wav", fmt).tobytes()
    assert len(written) == len(clip) + 100 and written[: len(clip)] == clip
    one_line_error(capsys, ["generate", str(audio_run), "--prompt", "hello", "--out", str(tmp_path / "x.wav")],
                   "this is an audio model")
    one_line_error(capsys, ["generate", str(audio_run), "--out", str(tmp_path / "x.wav"), "--seconds", "1",
                            "--max-bytes", "3"], "give --seconds or --max-bytes, not both")


def test_a_bytes_model_refuses_image_and_audio_flags(capsys, tmp_path):
    model = Megabyte(MegabyteConfig.from_name("tiny"))
    model.save_pretrained(tmp_path / "m")
    one_line_error(capsys, ["generate", str(tmp_path / "m"), "--prompt-image", "x.png"], "this model generates bytes")


def test_generated_png_of_wrong_length_is_refused():
    with pytest.raises(DataError, match="are not one 8x8x3 image"):
        files.to_file(b"\x00" * 10, ImageFormat(8, 8, 3))
