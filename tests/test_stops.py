"""Stop sequences matched by an Aho-Corasick automaton (generation/stops.py): at every byte it says what checking
each stop sequence with `endswith` in list order said (which one ends here, the first listed of those), and holds
back exactly the longest tail that may still become one; the engine bounds their number and length."""

import random

import pytest

from bytelm.errors import GenerationError
from bytelm.generation.sampling import MAX_STOP_BYTES, MAX_STOPS, SamplingParams
from bytelm.generation.stops import StopMatcher


def _by_endswith(g: bytes, stops: tuple[bytes, ...]) -> tuple[str, object]:
    """The engine's former rule, checked against every stop sequence at every byte."""
    for s in stops:
        if g.endswith(s):
            return "stop", s
    return "hold", max((k for s in stops for k in range(min(len(s) - 1, len(g)), 0, -1) if g.endswith(s[:k])),
                       default=0)


def test_the_automaton_agrees_with_checking_every_stop_sequence_at_every_byte():
    rng = random.Random(0)
    stopped = 0
    for _ in range(1500):  # small alphabets: overlaps, shared prefixes, stops inside stops, duplicates
        stops = tuple(bytes(rng.choice(b"ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 5)))
        m, state, g = StopMatcher(stops), 0, bytearray()
        for _ in range(40):
            g.append(rng.choice(b"abc"))
            state = m.step(state, g[-1])
            s = m.stop_at(state)
            assert (("stop", s) if s is not None else ("hold", m.held(state))) == _by_endswith(bytes(g), stops)
            if s is not None:
                stopped += 1
                break
    assert stopped > 1000  # the stopping branch is exercised, not only the holding one


def test_when_several_stop_sequences_end_together_the_first_listed_is_cut():
    for stops, cut in [((b"b", b"ab"), b"b"), ((b"ab", b"b"), b"ab")]:
        m = StopMatcher(stops)
        assert m.stop_at(m.step(m.step(0, ord("a")), ord("b"))) == cut


def test_the_engine_refuses_more_or_longer_stop_sequences_than_it_bounds():
    model = type("M", (), {"config": type("C", (), {"max_seq_len": 64})()})()
    SamplingParams(max_new_bytes=1, stop=(b"x" * MAX_STOP_BYTES,) * MAX_STOPS).check(model, 1)  # at the bound
    for stop in [(b"x",) * (MAX_STOPS + 1), (b"x" * (MAX_STOP_BYTES + 1),)]:
        with pytest.raises(GenerationError, match=f"at most {MAX_STOPS} stop sequences of at most {MAX_STOP_BYTES}"):
            SamplingParams(max_new_bytes=1, stop=stop).check(model, 1)


def test_stop_sequences_at_the_engines_bound_cost_the_decoding_loop_nothing_measurable():
    """128 stop sequences of 1,024 bytes that never match: a 900-byte greedy stream takes about what it takes without
    them (checking each with `endswith` per byte made it several times slower: ~1,000x the work per byte). The
    automaton is built at submit, before the timing starts (outside the engine's lock)."""
    import time

    import torch

    from bytelm import MegabyteConfig
    from bytelm.generation.engine import Engine
    from bytelm.models import build

    torch.manual_seed(0)
    engine = Engine(build(MegabyteConfig.from_name("tiny", max_seq_len=1024)).eval(), max_streams=1)
    stops = tuple(bytes([i % 256, 255]) + b"\xfe" * (MAX_STOP_BYTES - 2) for i in range(MAX_STOPS))

    def timed(stop) -> float:
        outs = engine.stream(b"z", SamplingParams(max_new_bytes=900, temperature=0, stop=stop))
        t0 = time.perf_counter()
        assert sum(len(o.data) for o in outs) == 900  # none matched
        return time.perf_counter() - t0

    timed(())  # warm
    plain, bound = min(timed(()) for _ in range(2)), min(timed(stops) for _ in range(2))
    assert bound < 1.5 * plain + 0.05, (plain, bound)
