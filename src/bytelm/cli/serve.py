"""`bytelm serve MODEL`: an OpenAI-compatible HTTP server (needs `pip install bytelm[serve]`)."""

from __future__ import annotations

import dataclasses
import errno
import math
import socket
import sys
from dataclasses import dataclass
from typing import Literal

from ..errors import UsageError
from .models import ModelArg, load, load_remote
from .options import parse

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeArgs:
    """Serves /v1/completions and /v1/chat/completions (a bytes model), /v1/images/generations (an image model: PNGs)
    or /v1/audio/generations (an audio model: WAVs), and /v1/models, /health and /metrics; every stream of every
    request decodes in one continuous batch. Ctrl-C stops taking requests, lets running streams finish (up to
    --drain-timeout) and exits."""

    model: ModelArg = None
    """a model folder, a training run folder or a hub id (org/name); with --adapter: its base"""
    adapter: str | None = None  # a LoRA adapter folder (or hub id) to serve on top of MODEL (merged at load)
    host: str = "127.0.0.1"  # the address to listen on (loopback by default: nothing outside this machine reaches it)
    port: int = 8000
    allowed_hosts: list[str] = dataclasses.field(default_factory=list)
    """Host header names to answer to besides localhost, 127.0.0.1 and [::1] (on loopback only those are answered,
    against DNS rebinding; on another address, given any: only these)"""
    api_key: str | None = None  # require 'Authorization: Bearer KEY' on /v1/* (default: no key)
    model_name: str | None = None  # the id clients name in "model" (default: MODEL as given)
    max_streams: int = 16  # streams decoding at once (the batch's rows)
    max_queue: int = 64  # requests waiting for a stream beyond those; more get 429 with Retry-After
    prefill_budget: int = 1024  # prompt bytes prefilled per step; more waits, longer prompts go in chunks between steps
    compile: bool = False  # capture the decode step with torch.compile (minutes of compiling before serving)
    max_request_bytes: int = 1 << 20  # larger request bodies get 413
    body_timeout: float = 30.0  # seconds a request body may stop arriving before a 408
    drain_timeout: float = 30.0  # seconds running streams get to finish on shutdown
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"  # uvicorn's
    initial_peers: list[str] = dataclasses.field(default_factory=list)
    """serve MODEL with its global model on the swarm reached through these peers (bytelm swarm serve)"""
    swarm: str | None = None  # with --initial-peers: the swarm's name in the DHT (default: derived from MODEL)
    verify_fraction: float = 0.0  # with --initial-peers: spot-check this fraction of the servers' steps


def main(argv: list[str]) -> int:
    args = parse(ServeArgs, argv, "bytelm serve")
    try:
        import uvicorn

        from ..generation.engine import Engine
        from ..serve import ServerLimits, create_app
    except ImportError as e:
        raise UsageError(f"bytelm serve needs the serving extras: pip install 'bytelm[serve]' ({e.name} is "
                         "missing)") from None
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.max_streams < 1 or args.max_queue < 0 or args.max_request_bytes < 1 or args.prefill_budget < 1:
        raise UsageError("--max-streams, --prefill-budget and --max-request-bytes must be >= 1, --max-queue >= 0")
    if not (math.isfinite(args.drain_timeout) and args.drain_timeout >= 0):
        raise UsageError(f"--drain-timeout must be a finite number of seconds >= 0, got {args.drain_timeout}")
    if not (math.isfinite(args.body_timeout) and args.body_timeout > 0):
        raise UsageError(f"--body-timeout must be a finite number of seconds > 0, got {args.body_timeout}")
    sock = listen(args.host, args.port)  # before the model loads: a port in use is known at once
    if args.host not in LOOPBACK and args.api_key is None:
        print(f"bytelm serve: warning: listening on {args.host} without --api-key: anyone who can reach it can use "
              "it", file=sys.stderr)
    if args.initial_peers:
        model = load_remote(args.model, args.adapter, args.initial_peers, args.swarm, merge=True,
                            verify_fraction=args.verify_fraction)
    else:
        model = load(args.model, args.device, args.adapter, merge=True)
    model.eval()
    name = args.model_name or args.model or args.adapter
    engine = Engine(model, max_streams=args.max_streams, max_queue=args.max_queue, prefill_budget=args.prefill_budget,
                    compile=args.compile)
    limits = ServerLimits(args.max_request_bytes, drain_timeout_s=args.drain_timeout, body_timeout_s=args.body_timeout)
    app = create_app(engine, name, args.api_key, limits, allowed_hosts(args.host, args.allowed_hosts))
    port = sock.getsockname()[1]  # --port 0: the one the system chose
    media = model.config.media
    what = "" if media is None else f", {media.describe()}"
    print(f"bytelm serve: {name} ({model.model_type}, {model.num_params() / 1e6:.1f}M params, context "
          f"{model.config.max_seq_len} bytes{what}) on http://{args.host}:{port}/v1", file=sys.stderr, flush=True)
    # uvicorn bounds a request's headers (h11: 16 KiB) and closes a keep-alive connection idle for
    # timeout_keep_alive s; it has no timeout for headers that trickle in on a new connection (slowloris): a server
    # open to untrusted clients belongs behind a reverse proxy that has one (nginx's client_header_timeout)
    config = uvicorn.Config(app, host=args.host, port=port, log_level=args.log_level, timeout_keep_alive=5,
                            timeout_graceful_shutdown=args.drain_timeout)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it drained on; uvicorn.run() swallows it too
        pass
    return 0


def allowed_hosts(host: str, extra: list[str]) -> tuple[str, ...] | None:
    """The Host names the server answers to: on loopback the loopback names and `extra` (a web page cannot then
    reach it through DNS rebinding); elsewhere `extra` if given, else any (None)."""
    from ..serve.middleware import LOOPBACK_HOSTS

    if host in LOOPBACK:
        return (*LOOPBACK_HOSTS, *extra)
    return tuple(extra) or None


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (as uvicorn binds one), or one clear line saying why it cannot be."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: cannot be resolved ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = "is in use by another program" if e.errno == errno.EADDRINUSE else f"cannot be bound: {e.strerror}"
        raise UsageError(f"{host}:{port} {why}; choose another --port (or --port 0 for any free one)") from None
    sock.set_inheritable(True)
    return sock
