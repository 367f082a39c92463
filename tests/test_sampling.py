"""Batched sampling (`sample_batch` over `SamplingMetadata`): a seeded row gives exactly what it gives alone, whatever
else is in the batch, and greedy, temperature, top-k and top-p do what they say."""

import random

import pytest
import torch

from bytelm.errors import GenerationFailed
from bytelm.generation import SamplingMetadata, SamplingParams, sample, sample_batch
from bytelm.generation.engine import SamplingParams as EngineSamplingParams

SETTINGS = [  # (temperature, top_k, top_p)
    (0, None, None), (0.8, None, None), (1.0, 5, None), (0.7, None, 0.9), (1.3, 20, 0.5), (0, 3, 0.2),
    (2.0, 1, None), (0.5, None, 1.0), (1.0, 256, None), (1e-3, None, None), (0.9, 40, 0.95), (1.0, None, 1e-6),
]


def _logits(step: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 256, generator=g) * (1 + 3 * torch.rand(n, 1, generator=g))  # peaked and flat rows


def test_sampling_params_live_in_sampling_and_the_engine_reexports_them():
    assert EngineSamplingParams is SamplingParams


def test_a_seeded_row_gives_what_it_gives_alone_in_any_batch_over_many_steps():
    n, steps = len(SETTINGS), 10
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in SETTINGS]
    logits = [_logits(s, n) for s in range(steps)]  # request i's logits at its step s
    alone = []  # what each request gives alone: sample() on its own row, with its own generator
    for i, (t, k, p) in enumerate(SETTINGS):
        g = torch.Generator().manual_seed(i)
        alone.append([int(sample(logits[s][i : i + 1], t, k, p, g)[0]) for s in range(steps)])
        g = torch.Generator().manual_seed(i)  # sample_batch with one row is the same
        one = [int(sample_batch(logits[s][i : i + 1], SamplingMetadata.from_params([params[i]], [g]))[0][0])
               for s in range(steps)]
        assert one == alone[i]
    rng = random.Random(0)
    for _trial in range(3):  # batches of changing make-up: requests wait, join and leave; unseeded rows among them
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        got = [[] for _ in range(n)]
        while any(len(g) < steps for g in got):
            left = [i for i in range(n) if len(got[i]) < steps]
            order = rng.sample(left, rng.randint(1, len(left))) + [-1] * rng.randint(0, 3)  # -1: unseeded
            rng.shuffle(order)
            meta = SamplingMetadata.from_params([params[i] if i >= 0 else SamplingParams(temperature=0.9)
                                                 for i in order], [gens[i] if i >= 0 else None for i in order])
            x = torch.stack([logits[len(got[i])][i] if i >= 0 else torch.randn(256) for i in order])
            nxt, bad = sample_batch(x, meta)
            assert bad is None
            for j, i in enumerate(order):
                if i >= 0:
                    got[i].append(int(nxt[j]))
        assert got == alone


def test_all_greedy_is_one_argmax_and_greedy_rows_in_a_mixed_batch_are_argmax():
    x = _logits(0, 16)
    meta = SamplingMetadata.uniform(16, temperature=0)
    assert meta.all_greedy
    nxt, bad = sample_batch(x, meta)
    assert bad is None and torch.equal(nxt, x.argmax(-1))
    temps = [0, 1.0] * 8
    gens = [torch.Generator().manual_seed(i) for i in range(16)]
    meta = SamplingMetadata.build(temps, [None] * 16, [None] * 16, gens)
    nxt, _ = sample_batch(x, meta)
    assert torch.equal(nxt[0::2], x[0::2].argmax(-1))
    assert torch.equal(sample(x.to(torch.bfloat16), 0), x.to(torch.bfloat16).argmax(-1))


def test_top_k_never_picks_outside_the_k_likeliest():
    x = _logits(1, 6) * 0.2  # flat: without top-k almost any byte could come
    ks = [1, 2, 5, 17, 100, None]
    meta = SamplingMetadata.build([1.5] * 6, ks, [None] * 6, [torch.Generator().manual_seed(i) for i in range(6)])
    assert meta.any_top_k and not meta.any_top_p
    seen = [set() for _ in ks]
    for _ in range(300):
        nxt, _ = sample_batch(x, meta)
        for i, b in enumerate(nxt.tolist()):
            seen[i].add(b)
    for i, k in enumerate(ks[:-1]):
        top = set(x[i].topk(k).indices.tolist())
        assert seen[i] <= top
        assert k > 5 or seen[i] == top  # a small k: every one of the k shows up
    assert len(seen[-1]) > 100  # the row without top-k is untouched


def test_top_p_keeps_the_smallest_set_reaching_p_and_always_the_likeliest():
    probs = torch.tensor([0.5, 0.3, 0.15] + [0.05 / 253] * 253)
    x = probs.log()[torch.randperm(256, generator=torch.Generator().manual_seed(0))]  # bytes in some order
    rank = x.argsort(descending=True).tolist()  # rank[j]: the byte with the j-th largest probability
    cases = [(0.7, 2), (0.49, 1), (0.51, 2), (0.79, 2), (0.81, 3), (0.94, 3), (1e-6, 1), (None, 256)]
    n = 2000
    g = torch.Generator().manual_seed(3)
    for p, keep in cases:
        nxt = sample(x.expand(n, 256), 1.0, top_p=p, generator=g)
        if keep <= 3:
            assert set(nxt.tolist()) == set(rank[:keep]), (p, keep)
        else:
            assert len(set(nxt.tolist()) - set(rank[:3])) > 20  # no top-p: the tail is drawn too
    # a row without top-p beside rows with one is untouched
    meta = SamplingMetadata.build([1.0, 1.0], [None, None], [0.45, None], [torch.Generator().manual_seed(1)] * 2)
    draws = torch.stack([sample_batch(x.expand(2, 256), meta)[0] for _ in range(400)])
    assert set(draws[:, 0].tolist()) == {rank[0]} and len(set(draws[:, 1].tolist())) > 5


def test_temperature_towards_zero_approaches_greedy():
    x = _logits(2, 32)
    gap = x.topk(2).values.diff(dim=-1).abs().min()
    assert gap > 1e-2  # so the runner-up's probability is below e^-100 at t = 1e-4
    for t in (1e-4, 1e-6, 1e-30):
        assert torch.equal(sample(x, t, generator=torch.Generator().manual_seed(0)), x.argmax(-1)), t
    hot = sample(x, 100.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(hot, x.argmax(-1))


@pytest.mark.parametrize("temperature, top_k", [(0.8, None), (1.5, 3)])
def test_sampled_frequencies_match_the_softmax(temperature, top_k):
    logits = torch.full((256,), -40.0)  # bytes outside the 8 have probability ~e-35: never drawn
    logits[[7, 30, 31, 100, 128, 200, 254, 255]] = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.7])
    want = (logits / temperature).softmax(-1)
    if top_k is not None:
        keep = logits.topk(top_k).indices
        want = torch.zeros(256).index_copy(0, keep, (logits[keep] / temperature).softmax(-1))
    n = 20_000
    draws = sample(logits.expand(n, 256), temperature, top_k, generator=torch.Generator().manual_seed(12345))
    counts = torch.bincount(draws, minlength=256).double()
    expected = want.double() * n
    support = expected > 1e-6  # the 8 bytes (or the top k of them)
    assert counts[~support].sum() == 0
    chi2 = float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())
    dof = int(support.sum()) - 1
    assert chi2 < 30, (chi2, dof)  # fixed seed; a correct sampler exceeds 30 at 7 dof with probability ~1e-4


def test_a_seeded_request_is_reproducible_and_seeds_differ():
    x = _logits(3, 1) * 0.3
    runs = {}
    for seed in (1, 1, 2):
        g = torch.Generator().manual_seed(seed)
        out = [int(sample(x, 1.0, 50, 0.95, g)[0]) for _ in range(40)]
        runs.setdefault(seed, []).append(out)
    assert runs[1][0] == runs[1][1]
    assert runs[1][0] != runs[2][0]


def test_rows_with_non_finite_logits_are_reported_and_the_others_sampled_as_alone():
    x = _logits(4, 4)
    x[1, 3], x[3, 0] = float("nan"), float("inf")
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    meta = SamplingMetadata.build([0.9] * 4, [10] * 4, [None] * 4, gens)
    nxt, bad = sample_batch(x, meta)
    assert bad.tolist() == [False, True, False, True]
    for i in (0, 2):
        assert int(nxt[i]) == int(sample(x[i : i + 1], 0.9, 10, None, torch.Generator().manual_seed(i))[0])
    assert sample_batch(x, SamplingMetadata.uniform(4, 0))[1].tolist() == [False, True, False, True]
    with pytest.raises(GenerationFailed, match="not finite"):
        sample(x, 0.9)
    with pytest.raises(ValueError, match="rows"):
        sample_batch(x, SamplingMetadata.uniform(3, 0))


def test_the_smallest_accepted_temperature_and_top_p_sample_the_likeliest_byte():
    """Each at float32's smallest normal number (below it is refused): finite arithmetic, and only the top byte
    keeps any weight."""
    from bytelm.generation.sampling import SMALLEST

    x = _logits(3, 32)
    for kw in ({"temperature": SMALLEST}, {"top_p": SMALLEST}, {"temperature": SMALLEST, "top_p": SMALLEST}):
        assert torch.equal(sample(x, generator=torch.Generator().manual_seed(0), **{"temperature": 1.0, **kw}),
                           x.argmax(-1)), kw
