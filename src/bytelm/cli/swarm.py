"""`bytelm swarm serve|generate`: one model served by many machines (needs `pip install bytelm[swarm]`).

    bytelm swarm serve MODEL [--blocks I:J | --num-blocks N] [--initial-peers ADDR ...] [--host H] [--port P]
    bytelm swarm generate MODEL --initial-peers ADDR ... [--prompt TEXT] [--max-bytes N] [--verify-fraction F]
    bytelm swarm finetune BASE --initial-peers ADDR ... [bytelm finetune's options]
    bytelm swarm status MODEL --initial-peers ADDR ...
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from ..errors import UsageError
from .generate import GenerateArgs, emit, prompt_bytes
from .models import ModelArg, load_remote
from .options import parse


@dataclass
class SwarmServeArgs:
    """Holds a span of the model's global blocks (a byte transformer: its blocks) and serves it to the swarm's
    clients; announces itself, with its blocks' fingerprints, in the swarm's DHT until stopped (Ctrl-C: it announces
    itself offline, then exits). Without --swarm the name digests every weight of the model (read once, about a second
    per GB); with it, only the span's blocks are read."""

    model: ModelArg = None
    """a model folder, a training run folder or a hub id (org/name): only its blocks in the span are read"""
    blocks: str | None = None  # I:J, the blocks to serve (default: the span the swarm covers least)
    num_blocks: int | None = None  # without --blocks: how many blocks to take (default: all)
    initial_peers: list[str] = dataclasses.field(default_factory=list)  # multiaddrs of peers in the swarm
    host: str = "127.0.0.1"  # the address to listen on (loopback by default)
    port: int = 0  # 0: any free port
    swarm: str | None = None  # the swarm's name in the DHT (default: a digest of the model's config and every weight)
    max_cache_mb: float = 1024.0  # KV cache memory for all sessions; a session beyond it is refused
    session_timeout: float = 60.0  # seconds an idle session keeps its cache (a disconnected peer's: a few seconds)
    max_sessions_per_peer: int = 16  # sessions one peer may hold open at once; more are refused
    peer_cache_share: float = 0.5  # the share of --max-cache-mb one peer's sessions may hold
    max_request_tokens: int | None = None  # rows x positions in one request (default: what the span computes in ~1 s)
    announce_period: float = 30.0  # seconds between announcements (each lasts 3 periods)
    throughput: float | None = None  # announce this many steps/s instead of measuring
    threads: int | None = None  # torch threads (default: torch's)


@dataclass
class SwarmStatusArgs:
    """The servers of the model's swarm: their blocks, throughput, free cache and round trip from here, and how well
    each block is covered (a block nobody serves means no generation). Servers whose fingerprints differ from the
    model's (other weights under the same name) are listed as refused and cover nothing."""

    model: ModelArg = None
    """a model folder, a training run folder or a hub id (org/name)"""
    initial_peers: list[str] = dataclasses.field(default_factory=list)  # multiaddrs of peers in the swarm
    swarm: str | None = None  # the swarm's name in the DHT (default: derived from the model)


@dataclass
class SwarmGenerateArgs(GenerateArgs):
    """Generates like `bytelm generate`, with the global model served by the swarm: the local model, embeddings and
    head run here, the global blocks on the servers (crossed once per patch). A server that dies mid-generation is
    replaced and its cache rebuilt: the output does not change."""

    initial_peers: list[str] = dataclasses.field(default_factory=list)  # multiaddrs of peers in the swarm
    swarm: str | None = None  # the swarm's name in the DHT (default: derived from the model)
    verify_fraction: float = 0.0  # spot-check this fraction of steps on a second server; liars are banned
    request_timeout: float = 30.0  # seconds before a server that does not answer is given up on


def _blocks(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise UsageError(f"--blocks must be I:J (two integers), got {text!r}") from None
    return a, b


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("serve", "generate", "finetune", "status"):
        raise UsageError("usage: bytelm swarm serve MODEL ... | bytelm swarm generate MODEL --initial-peers ADDR ... | "
                         "bytelm swarm finetune BASE --initial-peers ADDR ... | bytelm swarm status MODEL "
                         "--initial-peers ADDR ...")
    try:
        import hivemind  # noqa: F401
    except ImportError:
        raise UsageError("bytelm swarm needs hivemind: pip install 'bytelm[swarm]'") from None
    from ..swarm import run_server, swarm_name

    if argv[0] == "serve":
        args = parse(SwarmServeArgs, argv[1:], "bytelm swarm serve")
        if args.blocks is not None and args.num_blocks is not None:
            raise UsageError("give --blocks or --num-blocks, not both")
        if args.num_blocks is not None and args.num_blocks < 1:
            raise UsageError("--num-blocks must be >= 1")
        blocks = None if args.blocks is None else _blocks(args.blocks)
        if args.max_sessions_per_peer < 1:
            raise UsageError("--max-sessions-per-peer must be >= 1")
        if not 0 < args.peer_cache_share <= 1:
            raise UsageError("--peer-cache-share must be in (0, 1]")
        if args.max_request_tokens is not None and args.max_request_tokens < 1:
            raise UsageError("--max-request-tokens must be >= 1")
        run_server(args.model, args.swarm or swarm_name(args.model), blocks, args.num_blocks, args.initial_peers,
                   args.host, args.port, args.max_cache_mb, args.announce_period, args.session_timeout,
                   args.throughput, args.threads, log=lambda m: print(f"bytelm swarm serve: {m}", file=sys.stderr,
                                                                       flush=True),
                   max_sessions_per_peer=args.max_sessions_per_peer, peer_cache_share=args.peer_cache_share,
                   max_request_tokens=args.max_request_tokens)
        return 0
    if argv[0] == "finetune":
        return _finetune(argv[1:])
    if argv[0] == "status":
        return _status(argv[1:])
    args = parse(SwarmGenerateArgs, argv[1:], "bytelm swarm generate")
    if not args.initial_peers:
        raise UsageError("name at least one peer of the swarm: --initial-peers ADDR")
    prompt = prompt_bytes(args)
    model = load_remote(args.model, args.adapter, args.initial_peers, args.swarm,
                        verify_fraction=args.verify_fraction, request_timeout=args.request_timeout)
    try:
        return emit(model, args, prompt)
    finally:
        model.swarm.close()


def _finetune(argv: list[str]) -> int:
    from ..swarm import SwarmFinetuneConfig, swarm_finetune
    from .runconfig import parse_run_config

    cfg, resume = parse_run_config(
        SwarmFinetuneConfig, argv, "bytelm swarm finetune",
        "`bytelm finetune` through a swarm: LoRA on the local model and the global byte embedding, trained here; the "
        "global blocks run on the swarm's servers, frozen, which return the gradients for their inputs.",
        resume="continue the fine-tune in --out-dir from its latest checkpoint")
    result = swarm_finetune(cfg, resume=resume)
    if result.get("val_bpb") is not None:
        base = result.get("base_val_bpb")
        print(f"done: step {result['step']}, validation bpb {result['val_bpb']:.3f}"
              f"{f' (the base: {base:.3f})' if base is not None else ''}. Adapter: {cfg.out_dir}")
    return 0


def _status(argv: list[str]) -> int:
    args = parse(SwarmStatusArgs, argv, "bytelm swarm status")
    if not args.initial_peers:
        raise UsageError("name at least one peer of the swarm: --initial-peers ADDR")
    from ..swarm import SwarmClient
    from ..swarm.registry import coverage
    from ..swarm.spans import fingerprints, read_config, remote_stack

    _, depth = remote_stack(read_config(args.model))
    prints = fingerprints(args.model)
    name = args.swarm or prints.name
    client = SwarmClient(name, depth, args.initial_peers, fingerprints=prints.blocks)
    try:
        infos = client.refresh(force=True)
        print(f"swarm {name}: {len(infos)} server(s) online for {depth} blocks")
        for peer, i in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[0])):
            rtt = client.rtt.get(peer)
            print(f"  {peer}  blocks {i.start}:{i.end}  {i.throughput:,.0f} steps/s  "
                  f"{i.cache_free / 2**20:,.0f} MiB cache free  "
                  f"{'unreachable' if rtt is None else f'{rtt * 1000:.1f} ms'}  (bytelm {i.version or '?'})")
        if client.others:
            print(f"{len(client.others)} server(s) under this name with other weights, refused (another model or "
                  "fine-tune):")
        for peer, (i, differ) in sorted(client.others.items(), key=lambda kv: (kv[1][0].start, kv[0])):
            what = ("announces no fingerprints" if not i.fingerprints else
                    f"mismatched fingerprints at block{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))}")
            print(f"  {peer}  blocks {i.start}:{i.end}  {what}  (bytelm {i.version or '?'})")
        for peer, i in sorted(client.old.items(), key=lambda kv: (kv[1].start, kv[0])):
            print(f"  {peer}  blocks {i.start}:{i.end}  refused: bytelm {i.version or '?'} does not take this "
                  "version's calls (upgrade it)")
        cov = coverage(infos, depth)
        gaps = [b for b, c in enumerate(cov) if c == 0]
        print("blocks nobody serves: " + (", ".join(map(str, gaps)) if gaps else "none"))
        return 1 if gaps else 0
    finally:
        client.close()
