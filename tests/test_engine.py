"""The continuous-batching engine: streams decoded together, joining and leaving at any step, give byte for byte
what each gives alone; per-row cached logits equal the full forward; cancelled streams free their slots at once."""

import itertools
import random
import threading

import pytest
import torch
from conftest import decode_and_check

from bytelm import GenerationError
from bytelm.generation.engine import Engine, EngineFull, SamplingParams
from bytelm.nn import Step


def _requests(seed: int, n: int, sampled: bool):
    rng = random.Random(seed)
    prompts = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 30))) for _ in range(n)]
    params = [SamplingParams(max_new_bytes=rng.randrange(1, 40), temperature=rng.choice([0.7, 1.0]) if sampled else 0,
                             top_k=rng.choice([None, 30]), top_p=rng.choice([None, 0.9]), seed=i) for i in range(n)]
    return prompts, params, rng


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_joining_and_leaving_equals_alone(model, sampled):
    """10 prompts of mixed lengths through 4 slots: rows join while others are mid-patch, leave at their own lengths,
    and their slots are reused; each stream's bytes are exactly model.generate's for that prompt alone."""
    prompts, params, rng = _requests(0, 10, sampled)
    alone = [model.generate(p, sp.max_new_bytes, temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                            seed=sp.seed) for p, sp in zip(prompts, params, strict=True)]
    engine = Engine(model, max_streams=4)
    got = [bytearray() for _ in prompts]
    finish = [None] * len(prompts)
    widths = set()
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.submit(p, sp, lambda o, i=i: (got[i].extend(o.data), finish.__setitem__(i, o.finish_reason)))
        for _ in range(rng.randrange(0, 5)):  # arrivals between steps
            engine.step()
            widths.add(engine.active)
    while engine.active or engine.queued:
        engine.step()
        widths.add(engine.active)
    assert [bytes(g) for g in got] == alone
    assert finish == ["length"] * len(prompts)
    assert max(widths) == 4 and len(widths) > 2  # batches really were mixed
    assert sorted(engine.free) == [0, 1, 2, 3]


def test_rows_at_different_positions_give_the_full_forward_logits(model):
    """Drive the state directly: rows prefilled at different times and lengths, stepped in changing subsets; every
    row's logits equal the full forward's at its own position."""
    torch.manual_seed(1)
    S, T = 4, 37
    x = torch.randint(0, 256, (S, T))
    full = model(x)  # (S, T, 256)
    starts = [0, 5, 9, 16]  # prompt lengths
    pos = list(starts)
    with torch.inference_mode():
        state = model.new_state(S, T)
        for row in (2, 0):  # two rows first; the others join later
            got = model.prefill(x[row : row + 1, : starts[row]], state, Step.make([row], [0], starts[row], "cpu"))
            torch.testing.assert_close(got[0], full[row, starts[row]], atol=1e-4, rtol=1e-4)
        live = [2, 0]
        rng = random.Random(0)
        for step in range(40):
            if step == 3:
                for row in (1, 3):
                    step = Step.make([row], [0], starts[row], "cpu")
                    got = model.prefill(x[row : row + 1, : starts[row]], state, step)
                    torch.testing.assert_close(got[0], full[row, starts[row]], atol=1e-4, rtol=1e-4)
                live += [1, 3]
            rows = [r for r in live if pos[r] < T - 1 and rng.random() < 0.8]  # some rows sit a step out
            if not rows:
                continue
            decode_and_check(model, state, x, full, pos, rows)
    assert min(pos) > 20


def test_stop_sequences_end_the_stream_and_are_never_sent(megabyte):
    """The stream ends at the first stop sequence, without it; bytes that might begin one are held back, never
    sent and then taken back."""
    base = megabyte.generate(b"ab", 200, temperature=0)
    stop = base[50:53]  # a 3-byte string the greedy stream produces
    first = base.find(stop)
    engine = Engine(megabyte, max_streams=2)
    outs = list(engine.stream(b"ab", SamplingParams(max_new_bytes=200, temperature=0, stop=(b"\xff\xfe", stop))))
    assert b"".join(o.data for o in outs) == base[:first]
    assert outs[-1].finish_reason == "stop" and outs[-1].generated == first + len(stop)
    sent = b""
    for o in outs[:-1]:  # while the stream goes on, what is sent is final: nothing is ever taken back
        sent += o.data
        assert base[:first].startswith(sent)


def test_logprobs_are_the_models(megabyte):
    """The chosen byte's log-probability and the top-n come from the model's distribution at that position."""
    engine = Engine(megabyte, max_streams=2)
    out = engine.generate(b"hello", SamplingParams(max_new_bytes=12, temperature=0.9, seed=3, logprobs=5))
    assert len(out.data) == len(out.logprobs) == 12
    seq = torch.tensor([list(b"hello" + out.data)])
    with torch.no_grad():
        lp = torch.log_softmax(megabyte(seq).float(), dim=-1)[0, 5:]  # (12, 256)
    for t, b in enumerate(out.data):
        item = out.logprobs[t]
        assert item.byte == b
        assert abs(item.logprob - float(lp[t, b])) < 1e-4
        assert [i for i, _ in item.top] == lp[t].topk(5).indices.tolist()
        assert all(a[1] >= c[1] for a, c in itertools.pairwise(item.top))


def test_cancel_frees_the_slot_at_the_next_step(megabyte):
    engine = Engine(megabyte, max_streams=1, max_queue=1)
    done = []
    a = engine.submit(b"a", SamplingParams(max_new_bytes=500, temperature=0), done.append)
    engine.submit(b"b", SamplingParams(max_new_bytes=3, temperature=0), done.append)
    with pytest.raises(EngineFull, match="try again"):  # 1 running + 1 waiting is the most
        engine.submit(b"c", SamplingParams(max_new_bytes=3), done.append)
    for _ in range(3):
        engine.step()
    assert engine.active == 1 and engine.queued == 1
    a.cancel()
    engine.step()  # a leaves, b joins in the same step
    assert any(o.finish_reason == "cancelled" for o in done)
    while engine.active:
        engine.step()
    assert done[-1].finish_reason == "length" and engine.free == [0]


def test_closing_a_stream_early_cancels_it(megabyte):
    engine = Engine(megabyte, max_streams=2).start()
    try:
        it = engine.stream(b"x", SamplingParams(max_new_bytes=2000, temperature=0))
        next(it)
        it.close()
        for _ in range(200):
            if engine.active == 0:
                break
            threading.Event().wait(0.01)
        assert engine.active == 0
    finally:
        engine.stop()


def test_threaded_engine_serves_concurrent_clients(megabyte):
    """Eight client threads against the engine's own thread: each gets what it gets alone."""
    prompts = [bytes([65 + i]) * (i + 1) for i in range(8)]
    alone = [megabyte.generate(p, 30, temperature=0) for p in prompts]
    engine = Engine(megabyte, max_streams=3).start()
    got = [None] * 8

    def client(i):
        got[i] = engine.generate(prompts[i], SamplingParams(max_new_bytes=30, temperature=0)).data

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.stop()
    assert got == alone


def test_two_threads_sharing_a_model_get_what_they_get_one_after_the_other(megabyte):
    prompts = [b"first prompt", b"second, longer prompt"]
    seq = [megabyte.generate(p, 200, temperature=0.8, seed=5) for p in prompts]
    got = [None, None]
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, megabyte.generate(prompts[i], 200,
                                                                                         temperature=0.8, seed=5)))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == seq


@pytest.mark.parametrize("params, match", [
    (SamplingParams(max_new_bytes=-1), "max_new_bytes"),
    (SamplingParams(temperature=float("nan")), "temperature"),
    (SamplingParams(stop=(b"",)), "stop"),
    (SamplingParams(stop=["x"]), "stop"),
    (SamplingParams(logprobs=21), "logprobs"),
    (SamplingParams(max_new_bytes=10**6), "max_seq_len"),
])
def test_bad_requests_are_refused_before_any_work(megabyte, params, match):
    engine = Engine(megabyte, max_streams=1)
    with pytest.raises(GenerationError, match=match):
        engine.submit(b"x", params, print)
    assert engine.queued == 0


def test_zero_bytes_finish_at_once(megabyte):
    out = Engine(megabyte).generate(b"x", SamplingParams(max_new_bytes=0))
    assert out.data == b"" and out.finish_reason == "length"
