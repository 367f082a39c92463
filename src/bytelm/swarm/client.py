"""The client side of a swarm: a model whose remote stack runs on other machines, with everything else at home.

    remote_model(MODEL, initial_peers)  a ByteLM like any other (generate, stream, the decoding engine, loss,
                                        LoRA): MEGABYTE's global model is a `RemoteStack`, a chain of servers;
                                        embeddings, the local model, the final norm and the head are local
    RemoteStack                         TransformerStack's interface (forward(x, caches, step), new_caches) over
                                        the swarm: training runs one autograd Function per server in the chain
                                        (stateless `forward`/`backward` RPCs; servers return the gradient for their
                                        input and never change their weights); caches are a `RemoteSession`

The pieces under it, each in its own module:

    session.RemoteSession   one decoding state: a chain of links over the blocks, each a server session with
                            the calls it was sent; a failed server's link is rebuilt elsewhere by replaying them, so
                            the new caches equal the lost ones and the output is unchanged
    session.History         a link's calls (inputs and wire steps): append, replay from a point, forget
    session.LiveRows        which calls still hold some row's caches: the rest are forgotten, so an engine's
                            history stays bounded by its live rows
    session.split           calls cut into requests of at most a server's `max_request_tokens` (rows x
                            positions, from its `info`): a step's calls over several requests, a call's rows in chunks
    session.Verifier        spot checks (`verify_fraction`) of one link with a second server kept in step, a third
                            to decide; a lying server is replaced by the verifier, whose caches are in step already
    peers.SwarmClient       the DHT, the RPCs, the servers known and their limits, bans and liars, the rule that
                            tells who lied, stateless requests, traffic counters (routing and bans: registry)
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BytelmError
from ..io import WEIGHTS_NAME
from ..nn import Step, TransformerStack
from .peers import SwarmClient
from .session import RemoteSession
from .spans import client_weights, fingerprints, load_client_parts, remote_stack


class _RemoteBlocks(torch.autograd.Function):
    """Blocks a..b-1 on a server: forward there, and backward there too (the input's gradient, weights frozen)."""

    @staticmethod
    def forward(ctx, x, client: SwarmClient, peer: str, a: int, b: int):
        ctx.client, ctx.peer, ctx.a, ctx.b = client, peer, a, b
        ctx.save_for_backward(x)
        return client.stateless("forward", [x.detach()], a, b, prefer=peer)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad = ctx.client.stateless("backward", [x.detach(), g.contiguous()], ctx.a, ctx.b, prefer=ctx.peer)
        return grad, None, None, None, None


class RemoteStack(nn.Module):
    """A TransformerStack whose blocks run on the swarm; its final norm (and rope, unused here) stay local."""

    def __init__(self, client: SwarmClient, stack: TransformerStack, depth: int) -> None:
        super().__init__()
        self.client, self.depth = client, depth
        self.dim, self.heads, self.max_pos = stack.dim, stack.heads, stack.max_pos
        self.norm = stack.norm

    def forward(self, x: torch.Tensor, caches: RemoteSession | None = None, step: Step | None = None
                ) -> torch.Tensor:
        if caches is not None:
            return self.norm(caches.step(x, step))
        h = x
        for peer, a, b in self.client.route(0, self.depth):
            h = _RemoteBlocks.apply(h, self.client, peer, a, b)
        return self.norm(h)

    def new_caches(self, batch: int, max_len: int, device, dtype) -> RemoteSession:
        return RemoteSession(self.client, batch, max_len, self.dim, torch.empty((), dtype=dtype).element_size())


def remote_model(model: str, initial_peers: list[str], swarm: str | None = None, **client_options):
    """MODEL (a model folder, run folder or hub id) with its remote stack served by the swarm reached through
    `initial_peers`: a ByteLM whose `.swarm` is its SwarmClient. Only the weights outside the remote stack are held;
    the blocks' are read once, a tensor at a time, for their fingerprints (which servers must announce to be used)."""
    config, weights = client_weights(model)
    _, depth = remote_stack(config)
    prints = fingerprints(model)
    client = SwarmClient(swarm or prints.name, depth, initial_peers, fingerprints=prints.blocks, **client_options)
    try:
        m = load_client_parts(config, weights, lambda cfg, stack: RemoteStack(client, stack, depth),
                              f"{model} ({WEIGHTS_NAME})")
    except BytelmError:
        client.close()
        raise
    m.swarm = client
    return m


__all__ = ["RemoteStack", "remote_model"]
