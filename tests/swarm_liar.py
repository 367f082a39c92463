"""A swarm server that lies (for tests/test_swarm.py only): it serves like `bytelm swarm serve` but
reverses the features of every output of its decoding steps after the first two calls of each session (a
constant shift would not do: the final LayerNorm removes it)."""

import sys

import torch

from bytelm.cli import main
from bytelm.swarm.server import SpanServer

honest = SpanServer._step


def lying(self, s, xs, calls):
    outs = honest(self, s, xs, calls)
    seen = getattr(s, "seen", 0)
    s.seen = seen + len(xs)
    return [o.flip(-1) if seen + i >= 2 else o for i, o in enumerate(outs)]


SpanServer._step = torch.inference_mode()(lying)
sys.exit(main(["swarm", "serve", *sys.argv[1:]]))
