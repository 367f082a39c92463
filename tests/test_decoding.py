"""The one decoding path: batched and chunked prefills equal the full forward, the engine lines MEGABYTE's rows up on
its patch borders without changing a byte, a long prompt never stalls running streams, and the compiled step
decodes what the eager one does."""

import random

import pytest
import torch
from conftest import decode_and_check

from bytelm import Megabyte
from bytelm.generation.engine import Engine, SamplingParams
from bytelm.nn import Step


def _prefill(model, state, rows: list[int], chunks: list[torch.Tensor], at: list[int]) -> torch.Tensor:
    """One batched prefill of chunks (one per row, any lengths) at byte positions `at`."""
    lens = [c.numel() for c in chunks]
    x = torch.zeros(len(chunks), max(max(lens), 1), dtype=torch.long)
    for j, c in enumerate(chunks):
        x[j, : c.numel()] = c
    step = Step.make(rows, at, max(a + n for a, n in zip(at, lens, strict=True)), "cpu", lens)
    return model.prefill(x, state, step)


def test_batched_and_chunked_prefills_give_the_full_forward_logits(model):
    """Prompts of different lengths prefilled together in one call, some of them in several chunks (each starting
    where the model can resume), rows stepping on at their own positions: every logit is the full forward's."""
    torch.manual_seed(2)
    B, T, align = 4, 45, model.prefill_align
    x = torch.randint(0, 256, (B, T))
    full = model(x)  # (B, T, 256)
    lengths = [0, 3 * align + 1, 5 * align, 7 * align + 3]  # prompt lengths, one empty
    with torch.inference_mode():
        state = model.new_state(B, T)
        # first call: rows 0 and 2 whole, rows 1 and 3 their first chunk of 2 alignments
        first = {0: lengths[0], 1: 2 * align, 2: lengths[2], 3: 2 * align}
        got = _prefill(model, state, [2, 0, 3, 1], [x[r, : first[r]] for r in (2, 0, 3, 1)], [0] * 4)
        for j, r in enumerate((2, 0, 3, 1)):
            if first[r] == lengths[r]:
                torch.testing.assert_close(got[j], full[r, lengths[r]], atol=1e-4, rtol=1e-4)
        # second call: the rest of rows 1 and 3 together, from their chunk borders
        got = _prefill(model, state, [3, 1], [x[3, first[3] : lengths[3]], x[1, first[1] : lengths[1]]],
                       [first[3], first[1]])
        torch.testing.assert_close(got[0], full[3, lengths[3]], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[1], full[1, lengths[1]], atol=1e-4, rtol=1e-4)
        pos = list(lengths)
        rng = random.Random(0)
        for _ in range(30):
            rows = [r for r in range(B) if pos[r] < T - 1 and rng.random() < 0.7]
            if not rows:
                continue
            decode_and_check(model, state, x, full, pos, rows)


def test_a_megabyte_chunk_must_start_at_a_patch_border(megabyte):
    with torch.inference_mode(), pytest.raises(ValueError, match="prefills from patch borders"):
        _prefill(megabyte, megabyte.new_state(1, 32), [0], [torch.zeros(3, dtype=torch.long)], [1])


def _run(engine: Engine, arrivals: dict[int, list[tuple[bytes, SamplingParams]]]) -> list[bytes]:
    """Submit requests at the given steps; run until all are done. The bytes of each, in submission order."""
    got: list[bytearray] = []
    step = 0
    while arrivals or engine.active or engine.queued:
        for prompt, params in arrivals.pop(step, []):
            got.append(bytearray())
            engine.submit(prompt, params, lambda o, g=got[-1]: g.extend(o.data))
        engine.step()
        step += 1
    return [bytes(g) for g in got]


def test_rows_arriving_at_random_are_lined_up_on_patch_borders(megabyte):
    """12 requests arriving at random steps with random prompt lengths: each stream is byte for byte what it is
    alone, and once lined up the global model runs for all rows at once, about once per P steps, not at most steps
    (what it does when rows are not lined up)."""
    rng = random.Random(1)
    P = megabyte.config.patch_size
    reqs = [(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20))),
             SamplingParams(max_new_bytes=rng.randrange(30, 60), temperature=rng.choice([0, 0.9]), seed=i))
            for i in range(12)]
    times = sorted(rng.randrange(0, 40) for _ in reqs)
    alone = [megabyte.generate(p, sp.max_new_bytes, temperature=sp.temperature, seed=sp.seed) for p, sp in reqs]
    stats = {}
    for align in (True, False):
        engine = Engine(megabyte, max_streams=12, align=align)
        arrivals: dict[int, list] = {}
        for t, r in zip(times, reqs, strict=True):
            arrivals.setdefault(t, []).append(r)
        assert _run(engine, arrivals) == alone
        stats[align] = engine.stats
    in_decode = {k: v["global_steps"] - v["prefill_calls"] for k, v in stats.items()}  # a prefill runs it once
    assert in_decode[True] <= stats[True]["steps"] / P + 1  # here 21 global steps in 86 steps, P = 4
    assert in_decode[False] > 1.5 * in_decode[True]  # here 48
    assert stats[True]["held_steps"] <= len(reqs) * (P - 1)  # each row waits at most P - 1 steps, once
    assert stats[True]["held_steps"] <= len(reqs) * (P - 1)  # each row waits at most P - 1 steps, once


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(model):
    """A prompt 12x the per-step budget arrives while a stream decodes: the stream gets a byte at every step of the
    long prefill, and both outputs are what they are alone."""
    budget = 4 * model.prefill_align
    long_prompt = bytes(random.Random(3).randrange(256) for _ in range(12 * budget + 3))
    short = SamplingParams(max_new_bytes=40, temperature=0)
    engine = Engine(model, max_streams=2, prefill_budget=budget)
    outs = {"short": bytearray(), "long": bytearray()}
    engine.submit(b"running", short, lambda o: outs["short"].extend(o.data))
    for _ in range(3):
        engine.step()
    engine.submit(long_prompt, SamplingParams(max_new_bytes=5, temperature=0), lambda o: outs["long"].extend(o.data))
    calls, before = engine.stats["prefill_calls"], len(outs["short"])
    steps = 0
    while not outs["long"]:
        engine.step()
        steps += 1
    assert engine.stats["prefill_calls"] - calls >= 12  # in chunks
    assert len(outs["short"]) - before >= steps - 1  # the running stream was not stalled
    while engine.active:
        engine.step()
    assert bytes(outs["short"]) == model.generate(b"running", 40, temperature=0)
    assert bytes(outs["long"]) == model.generate(long_prompt, 5, temperature=0)


@pytest.mark.parametrize("lengths, calls", [([20, 21, 22, 23, 24, 25, 24, 20], 1), ([4, 5, 6, 100, 110, 400], 3)])
def test_prompts_arriving_together_are_prefilled_in_few_calls(megabyte, lengths, calls):
    """Prompts arriving in one step share prefill calls by length: one call for similar lengths, never one padded
    to many times its bytes; each stream is what it is alone."""
    engine = Engine(megabyte, max_streams=8)
    reqs = [(bytes(random.Random(n).randrange(256) for _ in range(n)), SamplingParams(max_new_bytes=9, temperature=0))
            for n in lengths]
    assert _run(engine, {0: reqs}) == [megabyte.generate(p, 9, temperature=0) for p, _ in reqs]
    assert engine.stats["prefill_calls"] == calls


@pytest.mark.slow
@pytest.mark.parametrize("name", ["megabyte-rope", "transformer-rope"])
def test_the_compiled_decode_step_decodes_what_the_eager_one_does(name):
    """torch.compile over the decode step (dynamic shapes: rows joining and leaving never recompile): greedy output
    byte for byte the eager one's, streams mixed as in serving."""
    from conftest import CONFIGS, make

    eager, compiled = make(CONFIGS[name]), make(CONFIGS[name])
    rng = random.Random(4)
    reqs = [(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30))), SamplingParams(max_new_bytes=40,
                                                                                           temperature=0))
            for _ in range(6)]
    arrivals = {2 * i: [r] for i, r in enumerate(reqs)}
    want = _run(Engine(eager, max_streams=4), dict(arrivals))
    assert _run(Engine(compiled, max_streams=4, compile=True), dict(arrivals)) == want
    assert isinstance(compiled, Megabyte) == (compiled.decode_period > 1)
