import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bytelm
from bytelm.data import ByteDataset
from bytelm.evaluation import EvalResult, evaluate

LN2 = math.log(2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def make(kind: str, **overrides):
    torch.manual_seed(0)
    if kind == "megabyte":
        return bytelm.Megabyte(bytelm.MegabyteConfig.from_name("tiny", **overrides)).eval()
    return bytelm.ByteTransformer(bytelm.TransformerConfig.from_name("tiny", **overrides)).eval()


@pytest.fixture(params=["megabyte", "transformer"])
def model(request):
    return make(request.param)


@pytest.fixture
def megabyte():
    return make("megabyte")  # patch_size 4


def rand_bytes(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def seq_nats(model, b: bytes) -> float:
    """Summed nats of one window scored from its own start (every byte, the first one from nothing)."""
    x = torch.tensor(list(b), dtype=torch.long)[None]
    with torch.no_grad():
        return float(model.loss(x, reduction="sum"))


def per_byte(model, b: bytes) -> torch.Tensor:
    x = torch.tensor(list(b), dtype=torch.long)[None]
    with torch.no_grad():
        return F.cross_entropy(model(x)[0].float(), x[0], reduction="none").double()


def last_byte_nats(model, b: bytes) -> float:
    """Nats of the last byte of b predicted from all the bytes before it."""
    return float(per_byte(model, b)[-1])


def test_chunked_matches_hand_computation(model):
    data = rand_bytes(100)
    r = evaluate(model, data, seq_len=32, batch_size=3)
    expected = sum(seq_nats(model, data[s:s + 32]) for s in range(0, 100, 32))  # 32, 32, 32, 4
    assert isinstance(r, EvalResult)
    assert r.bytes == 100 and r.mode == "chunked" and r.seq_len == 32 and r.stride == 32
    assert r.nats == pytest.approx(expected, rel=1e-5)
    assert r.bpb == pytest.approx(expected / (LN2 * 100), rel=1e-5)


@pytest.mark.parametrize("mode", ["chunked", "sliding"])
def test_short_input_is_model_loss(model, mode):
    data = rand_bytes(23)
    x = torch.tensor(list(data))[None]
    with torch.no_grad():
        expected = float(model.loss(x)) / LN2
    r = evaluate(model, data, mode=mode)  # seq_len defaults to max_seq_len (2048): one window
    assert r.bpb == pytest.approx(expected, rel=1e-5)
    assert r.seq_len == model.config.max_seq_len


def test_sliding_with_full_stride_is_chunked(model):
    data = rand_bytes(150)
    chunked = evaluate(model, data, seq_len=40)
    sliding = evaluate(model, data, seq_len=40, mode="sliding", stride=40)
    assert sliding.nats == pytest.approx(chunked.nats, rel=1e-9)
    assert sliding.mode == "sliding" and sliding.stride == 40


@pytest.mark.parametrize("mode", ["chunked", "sliding", "strided"])
@pytest.mark.parametrize("n", [1, 5, 32, 33, 101])
def test_every_mode_scores_every_byte(model, mode, n):
    data = rand_bytes(n)
    r = evaluate(model, data, seq_len=16, mode=mode, stride=None if mode == "chunked" else 5)
    assert r.bytes == n
    # each byte's loss is positive, so scoring one byte more (or fewer) would change the total
    assert r.nats > 0 and math.isfinite(r.nats)
    if n > 1:
        assert evaluate(model, data, seq_len=16, mode=mode, max_bytes=n - 1).nats < r.nats


def test_sliding_uses_the_right_context(model):
    L, S, n = 16, 5, 53
    data = rand_bytes(n, seed=2)
    expected, min_ctx = 0.0, L
    for t in range(n):
        # windows start at 0, S, 2S, ...; window k >= 1 scores bytes [(k-1)S + L, kS + L)
        begin = 0 if t < L else ((t - L) // S + 1) * S
        expected += last_byte_nats(model, data[begin:t + 1])
        if t >= L:
            min_ctx = min(min_ctx, t - begin)
    assert min_ctx == L - S
    r = evaluate(model, data, seq_len=L, mode="sliding", stride=S, batch_size=2)
    assert r.bytes == n
    assert r.nats == pytest.approx(expected, rel=1e-5)


def strided_choice(j: int, P: int) -> str:
    o = P // 2
    return "B" if j >= P and j % P >= o else "A"


def test_strided_per_byte_takes_the_claimed_pass(megabyte):
    P = megabyte.config.patch_size
    o = P // 2
    n = 26
    data = rand_bytes(n, seed=3)
    a = per_byte(megabyte, data)  # pass A: patches start at 0
    b = per_byte(megabyte, data[o:])  # pass B: inputs offset by P/2
    expected = [float(a[j]) if strided_choice(j, P) == "A" else float(b[j - o]) for j in range(n)]
    # the rule picks, from each patch of pass A, its first half, and from pass B the other bytes
    assert [strided_choice(j, P) for j in range(12)] == ["A"] * 4 + ["A", "A", "B", "B"] * 2

    r = evaluate(megabyte, data, mode="strided", seq_len=32)
    assert r.mode == "strided" and r.note == ""
    assert r.nats == pytest.approx(sum(expected), rel=1e-5)
    # byte by byte: evaluating the first k bytes adds exactly byte k-1's loss from its claimed pass
    prev = 0.0
    for k in range(1, n + 1):
        cur = evaluate(megabyte, data, mode="strided", seq_len=32, max_bytes=k).nats
        assert cur - prev == pytest.approx(expected[k - 1], abs=1e-4), k
        prev = cur

    plain = evaluate(megabyte, data, seq_len=32)
    assert abs(r.nats - plain.nats) > 1e-3  # differs from plain inference
    assert evaluate(megabyte, data, mode="strided", seq_len=32).nats == r.nats  # deterministic


def test_strided_with_sliding_windows_matches_reference(megabyte):
    P, L, S, n = megabyte.config.patch_size, 20, 8, 70
    o = P // 2
    data = rand_bytes(n, seed=4)
    expected, begin, prev_end = 0.0, 0, 0
    while prev_end < n:
        end = min(begin + L, n)
        a = per_byte(megabyte, data[begin:end])
        b = per_byte(megabyte, data[begin + o:end])
        for t in range(prev_end, end):
            j = t - begin
            expected += float(a[j]) if strided_choice(j, P) == "A" else float(b[j - o])
        begin, prev_end = begin + S, end
    r = evaluate(megabyte, data, mode="strided", seq_len=L, stride=S, batch_size=2)
    assert r.bytes == n and r.stride == S
    assert r.nats == pytest.approx(expected, rel=1e-5)


def test_strided_on_a_model_without_patches_is_sliding():
    model = make("transformer")
    data = rand_bytes(60)
    r = evaluate(model, data, mode="strided", seq_len=16, stride=4)
    assert r.mode == "sliding" and "sliding" in r.note and r.to_dict()["note"] == r.note
    assert r.nats == evaluate(model, data, mode="sliding", seq_len=16, stride=4).nats


def test_byte_zero_is_scored(model):
    data = bytes(37)  # all zeros
    r = evaluate(model, data, seq_len=16)
    assert r.bytes == 37
    expected = seq_nats(model, data[:16]) * 2 + seq_nats(model, data[:5])
    assert r.nats == pytest.approx(expected, rel=1e-5)
    assert r.nats > 0


def test_input_kinds_agree(megabyte):
    data = rand_bytes(90, seed=5)
    arr = np.frombuffer(data, dtype=np.uint8)
    ds = ByteDataset([arr[:10], arr[10:55], arr[55:]])  # read across part boundaries
    results = [evaluate(megabyte, d, seq_len=24, mode="sliding", stride=10)
               for d in (data, bytearray(data), arr, arr.astype(np.int64), ds, torch.tensor(arr))]
    assert len({r.nats for r in results}) == 1
    assert evaluate(megabyte, ds, seq_len=24, max_bytes=30).nats == pytest.approx(
        evaluate(megabyte, data[:30], seq_len=24).nats, rel=1e-9)
    assert evaluate(megabyte, data, seq_len=24, max_bytes=10**9).bytes == 90


def test_batch_size_does_not_change_the_result(megabyte):
    data = rand_bytes(200, seed=6)
    one = evaluate(megabyte, data, seq_len=32, mode="strided", stride=12, batch_size=1)
    many = evaluate(megabyte, data, seq_len=32, mode="strided", stride=12, batch_size=16)
    assert many.nats == pytest.approx(one.nats, rel=1e-5)


def test_restores_training_mode(megabyte):
    megabyte.train()
    evaluate(megabyte, b"hello", progress=True)
    assert megabyte.training
    megabyte.eval()
    evaluate(megabyte, b"hello")
    assert not megabyte.training


def test_bad_inputs(megabyte):
    with pytest.raises(ValueError, match="empty"):
        evaluate(megabyte, b"")
    with pytest.raises(ValueError, match="empty"):
        evaluate(megabyte, ByteDataset([], name="val"))
    with pytest.raises(ValueError, match=r"seq_len must be in 1\.\.max_seq_len=2048"):
        evaluate(megabyte, b"abc", seq_len=4096)
    with pytest.raises(ValueError, match="seq_len must be in"):
        evaluate(megabyte, b"abc", seq_len=0)
    with pytest.raises(ValueError, match=r"stride must be in 1\.\.seq_len=8"):
        evaluate(megabyte, b"abc", seq_len=8, mode="sliding", stride=0)
    with pytest.raises(ValueError, match=r"stride must be in 1\.\.seq_len=8"):
        evaluate(megabyte, b"abc", seq_len=8, mode="strided", stride=9)
    with pytest.raises(ValueError, match="chunked windows do not overlap"):
        evaluate(megabyte, b"abc", seq_len=8, stride=4)
    with pytest.raises(ValueError, match="unknown mode 'bogus'"):
        evaluate(megabyte, b"abc", mode="bogus")
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(megabyte, b"abc", batch_size=0)
    with pytest.raises(ValueError, match="max_bytes"):
        evaluate(megabyte, b"abc", max_bytes=0)
    with pytest.raises(ValueError, match=r"byte values must be in 0\.\.255"):
        evaluate(megabyte, np.array([1, 256]))
    with pytest.raises(TypeError, match="encode"):
        evaluate(megabyte, "text")


def test_trained_model_scores_well_below_8_bits():
    model = make("megabyte")
    data = b"the quick brown fox jumps over the lazy dog. " * 12
    x = torch.tensor(list(data[:128]))[None]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        loss = model.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = evaluate(make("megabyte"), data, seq_len=128).bpb
    r = evaluate(model, data, seq_len=128)
    assert model.training  # restored
    assert before > 7.0
    assert r.bpb < 4.0, r
