"""Cached generation equals full recompute; sampling is seeded and its options behave."""

import pytest
import torch

from bytelm import GenerationError, MegabyteConfig
from bytelm.generation import sample
from bytelm.nn import Step

P = MegabyteConfig.from_name("tiny").patch_size


@pytest.mark.parametrize("L", [0, 1, P - 1, P, P + 1, 3 * P + 2])
def test_cached_logits_equal_full_forward(model, L):
    """prefill + decode_step logits at every position equal the full forward's, to float tolerance."""
    torch.manual_seed(3)
    x = torch.randint(0, 256, (2, 5 * P + 3 + L))
    full = model(x)  # (B, T, 256)
    with torch.no_grad():
        state = model.new_state(2, x.shape[1])
        got = [model.prefill(x[:, :L], state, Step.make([0, 1], [0, 0], L, "cpu"))]
        for t in range(L, x.shape[1] - 1):
            got.append(model.decode_step(x[:, t], state, Step.make([0, 1], [t, t], t + 1, "cpu")))
    got = torch.stack(got, dim=1)  # (B, T - L, 256)
    torch.testing.assert_close(got, full[:, L:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt", [b"", b"d", b"def main():\n"])
def test_greedy_cached_generation_equals_repeated_argmax(model, prompt):
    n = 120  # 30 of tiny's 4-byte patches: every window and patch border case recurs many times
    got = model.generate(prompt, n, temperature=0)
    seq = torch.tensor([list(prompt)], dtype=torch.long)
    with torch.no_grad():
        for _ in range(n):  # the definition: argmax of the full forward, one byte at a time
            logits = model(torch.cat((seq, seq.new_zeros(1, 1)), dim=1))[:, -1]
            seq = torch.cat((seq, logits.argmax(-1, keepdim=True)), dim=1)
    assert got == bytes(seq[0, len(prompt) :].tolist())
    assert len(got) == n
    assert model.generate(prompt, n, temperature=0, use_cache=False) == got


def test_batched_generation_equals_one_by_one(model):
    x = torch.randint(0, 256, (3, 2 * P + 1))
    out = model.generate(x, 40, temperature=0)
    assert out.shape == (3, 2 * P + 1 + 40)
    assert torch.equal(out[:, : x.shape[1]], x)
    for i in range(3):
        assert bytes(out[i, x.shape[1] :].tolist()) == model.generate(bytes(x[i].tolist()), 40, temperature=0)


def test_same_seed_same_bytes(model):
    a = model.generate(b"abc", 64, temperature=1.0, seed=7)
    assert a == model.generate(b"abc", 64, temperature=1.0, seed=7)
    assert a != model.generate(b"abc", 64, temperature=1.0, seed=8)
    assert b"".join(model.stream(b"abc", 64, seed=7)) == a


def test_stream_yields_one_byte_at_a_time(model):
    it = model.stream(b"x", 5, temperature=0)
    first = next(it)
    assert isinstance(first, bytes) and len(first) == 1
    assert first + b"".join(it) == model.generate(b"x", 5, temperature=0)


def test_sampling_options():
    torch.manual_seed(0)
    logits = torch.randn(4, 256)
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, temperature=0), greedy)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6), greedy)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, top_k=3, generator=g) for _ in range(200)])  # (200, 4)
    top3 = logits.topk(3).indices
    assert all(bool((top3[i] == draws[:, i : i + 1]).any(-1).all()) for i in range(4))
    # top_p keeps the smallest set reaching p: with one byte at 0.9 and p=0.5 only that byte survives
    peaked = torch.full((1, 256), -10.0)
    peaked[0, 42] = 10.0
    assert set(sample(peaked.expand(50, 256), 1.0, top_p=0.5).tolist()) == {42}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt="text", max_new_bytes=3), "bytes, not str"),
        (dict(prompt=b"a", max_new_bytes=2048), "exceeds this model's max_seq_len of 2048"),
        (dict(prompt=b"a", max_new_bytes=-1), "max_new_bytes must be >= 0"),
        (dict(prompt=b"a", max_new_bytes=3, temperature=-1.0), "temperature"),
        (dict(prompt=b"a", max_new_bytes=3, top_k=0), "top_k"),
        (dict(prompt=b"a", max_new_bytes=3, top_p=1.5), "top_p"),
        (dict(prompt=torch.tensor([[1.0, 2.0]]), max_new_bytes=3), "integer"),
        (dict(prompt=torch.tensor([[1, 300]]), max_new_bytes=3), "0..255"),
    ],
)
def test_bad_generation_arguments(megabyte, kwargs, match):
    with pytest.raises(GenerationError, match=match):
        megabyte.generate(**kwargs)


def test_zero_new_bytes(megabyte):
    assert megabyte.generate(b"abc", 0) == b""
    assert megabyte.generate(b"a" * 2048, 0) == b""


def test_generation_leaves_training_mode_alone(megabyte):
    megabyte.train()
    megabyte.generate(b"a", 3)
    assert megabyte.training


def test_audio_generation_longer_than_the_context_names_both_limits(tmp_path, capsys):
    """More new audio than the model's context: the limit without a prompt (the whole context) and with one."""
    from bytelm import Megabyte
    from bytelm.cli import main

    cfg = MegabyteConfig.from_name("tiny", max_seq_len=64, modality="audio:8000:mulaw")
    Megabyte(cfg).save_pretrained(tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--out", str(tmp_path / "a.wav"), "--max-bytes", "64"]) == 0
    assert main(["generate", str(tmp_path / "m"), "--out", str(tmp_path / "b.wav"), "--max-bytes", "65"]) == 2
    err = capsys.readouterr().err
    assert "at most 64 from no prompt, 63 after a prompt" in err and not (tmp_path / "b.wav").exists()


def test_seeded_batches_sample_the_same_with_and_without_the_cache(model):
    """Row i draws from its own generator (seed + i) on both paths, so a batch's sampled rows agree whatever the
    path, and each equals its prompt alone with seed + i."""
    x = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(0))
    cached = model.generate(x, 24, temperature=0.9, top_k=50, seed=11)
    assert torch.equal(cached, model.generate(x, 24, temperature=0.9, top_k=50, seed=11, use_cache=False))
    for i in range(3):
        assert bytes(cached[i, 5:].tolist()) == model.generate(bytes(x[i].tolist()), 24, temperature=0.9, top_k=50,
                                                                seed=11 + i)
