"""The swarm (bytelm.swarm): real `bytelm swarm serve` processes on loopback, each started in its own session and
killed by process group; the client in this process. Invariants: through the swarm equals local (greedy, byte for
byte; loss; a fine-tune), also after a server is killed with SIGKILL mid-generation; a server that joins later is
used; a lying server is caught by the spot check; malformed requests get errors and the server goes on; servers of
other weights (one global block changed) get another default swarm name and, forced under the same name, are
refused; one peer's sessions and one request's size are capped, a disconnected peer's sessions freed."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("hivemind")
pytest.importorskip("peft")

from conftest import engine_outputs  # noqa: E402

from benchmarks.swarm import Server as _Server  # noqa: E402
from bytelm import Megabyte, MegabyteConfig  # noqa: E402
from bytelm.generation.engine import Engine, SamplingParams  # noqa: E402
from bytelm.nn import Step  # noqa: E402
from bytelm.swarm import ServerFailed, SwarmError, remote_model, swarm_lora, swarm_name  # noqa: E402

HERE = Path(__file__).parent
CLIENT = dict(request_timeout=10.0, refresh_period=0.2, ban_seconds=30.0)


def Server(folder, *args, liar: bool = False) -> _Server:
    """A real server process (benchmarks.swarm.Server), announcing every 2 s, with a 64 MiB cache budget."""
    cmd = [sys.executable, str(HERE / "swarm_liar.py")] if liar else None
    return _Server(folder, "--announce-period", "2", "--max-cache-mb", "64", *args, cmd=cmd)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    cfg = MegabyteConfig(**{**MegabyteConfig.presets["tiny"], "global_layers": 4})
    path = tmp_path_factory.mktemp("swarm") / "model"
    Megabyte(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def local(folder):
    return Megabyte.from_pretrained(folder)


@pytest.fixture(scope="module")
def other(folder):
    """The model with one weight of global block 2 changed (what a merged fine-tune of the global model is, in
    small): another model to a swarm."""
    m = Megabyte.from_pretrained(folder)
    with torch.no_grad():
        m.global_model.blocks[2].mlp.fc.weight[0, 0] += 1e-3
    path = folder.parent / "other"
    m.save_pretrained(path)
    return path


def start(folder, spans, *args: str) -> list[Server]:
    """Servers for `spans` (each "I:J"), joined through the first of them, once the DHT shows them all."""
    servers = [Server(folder, "--blocks", spans[0], *args)]
    try:  # a server that fails to start (or a DHT that never shows them) must not leave the others running
        first = servers[0].wait()
        for span in spans[1:]:
            servers.append(Server(folder, "--blocks", span, "--initial-peers", first.addr, *args))
        for s in servers:
            s.wait()
        return seen(folder, servers)
    except BaseException:
        for s in servers:
            s.kill()
        raise


def seen(folder, servers: list[Server]) -> list[Server]:
    """Wait until a client finds every one of `servers` announced: a server prints its address after storing its
    announcement, but a lookup may reach DHT nodes that have not got it yet."""
    from bytelm.swarm import SwarmClient

    client = SwarmClient(swarm_name(folder), 4, [servers[0].addr])  # no fingerprints: sees every server
    try:
        deadline = time.monotonic() + 30
        while not {s.peer for s in servers} <= set(client.refresh(force=True)):
            assert time.monotonic() < deadline, "servers never showed up in the DHT"
            time.sleep(0.2)
    finally:
        client.close()
    return servers


@pytest.fixture(scope="module")
def swarm(folder):
    # overlapping spans; a request may carry 10,000 rows x positions (the streamed test's 17 x 512 fit)
    servers = start(folder, ["0:2", "1:4", "2:4"], "--max-request-tokens", "10000")
    yield servers
    for s in servers:
        s.kill()


@pytest.fixture(scope="module")
def remote(folder, swarm):
    m = remote_model(str(folder), [swarm[0].addr], **CLIENT)
    yield m
    m.swarm.close()


PROMPT = b"def main(argv):\n    return "


def test_generation_through_the_swarm_equals_local(remote, local):
    assert remote.generate(PROMPT, 48, temperature=0) == local.generate(PROMPT, 48, temperature=0)
    # a continuous batch: rows at different positions (per-row positions and row subsets on the servers)
    prompts = [b"", b"import os\n", PROMPT, b"class A:\n    def __init__(self):"]
    params = SamplingParams(max_new_bytes=21, temperature=0)
    assert engine_outputs(remote, prompts, params, 3) == [local.generate(p, 21, temperature=0) for p in prompts]


def test_loss_through_the_swarm_equals_local(remote, local):
    x = torch.randint(0, 256, (2, 64))
    assert torch.allclose(remote.loss(x), local.loss(x), atol=1e-5)


def test_bad_requests_get_errors_and_the_server_goes_on(remote, swarm):
    c, peer = remote.swarm, swarm[0].peer  # blocks 0:2, width 64
    good = {"session": "s" * 16, "batch": 2, "max_len": 8, "start": 0, "end": 2}
    c.call(peer, "open", [], good)
    x = torch.zeros(2, 1, 64)
    ok = {"rows": [0, 1], "pos": [0, 0], "span": 1}
    bad = [
        ("step", [x], {"session": "nope" * 4, "calls": [ok]}, "unknown session"),
        ("step", [x.double()], {"session": "s" * 16, "calls": [ok]}, "x must be float32"),
        ("step", [torch.zeros(2, 1, 63)], {"session": "s" * 16, "calls": [ok]}, "x must be"),
        ("step", [x * float("nan")], {"session": "s" * 16, "calls": [ok]}, "inf or nan"),
        ("step", [x], {"session": "s" * 16, "calls": [{**ok, "pos": [8, 0]}]}, "pos must list 2 integers in"),
        ("step", [x], {"session": "s" * 16, "calls": [{**ok, "pos": 0}]}, "pos must list"),
        ("step", [x[:1]], {"session": "s" * 16, "calls": [{**ok, "rows": [5], "pos": [0]}]}, "rows must list 1"),
        ("step", [x], {"session": "s" * 16, "calls": [{**ok, "rows": [1, 1]}]}, "distinct rows"),
        ("step", [x], {"session": "s" * 16, "calls": [{**ok, "pos": [0, 1], "span": 1}]}, "span must be"),
        ("step", [torch.zeros(2, 3, 64)], {"session": "s" * 16, "calls": [{**ok, "pos": [0, 6]}]}, "run past"),
        ("step", [x], {"session": "s" * 16, "calls": [{**ok, "lens": [0, 2]}]}, "lens must list"),
        ("step", [x, x], {"session": "s" * 16, "calls": [ok]}, "one tensor per call"),
        ("open", [], {**good, "session": "t" * 16, "start": 1, "end": 3}, "end must be"),
        ("open", [], {**good, "session": "u" * 16, "batch": 1024, "max_len": 512}, "refused"),
        ("forward", [torch.zeros(1, 5000, 64)], {"start": 0, "end": 2}, "allowed"),
        ("forward", [torch.zeros(20, 512, 64)], {"start": 0, "end": 2},
         r"refused: 10240 rows x positions in one request, over this server's limit of 10000 \(--max-request-tokens"),
        ("launch", [], {}, "unknown operation"),
    ]
    for op, tensors, meta, why in bad:
        with pytest.raises(ServerFailed, match=why):
            c.call(peer, op, tensors, meta)
    outs, _ = c.call(peer, "step", [x], {"session": "s" * 16, "calls": [ok]})  # still serving
    assert outs[0].shape == x.shape and torch.isfinite(outs[0]).all()
    assert c.info(peer)["errors"] >= len(bad)


def test_a_refusal_reaches_the_client_as_its_type(remote, swarm):
    """The server's error reply carries a code; the client tells a lost session from a bad request by the error's
    type (which decides whether the server is banned), not by its message."""
    from bytelm.errors import UnknownSession
    from bytelm.swarm import wire

    for e in (UnknownSession("unknown session (never opened, closed, or expired)"), wire.BadMessage("x holds nan")):
        got = wire.error_of(wire.unpack_meta(wire.pack([], wire.error_reply(e))[1]))
        assert type(got) is type(e) and str(got) == str(e)
    assert wire.error_of({"cache_free": 1}) is None
    assert type(wire.error_of({"error": {"code": "from_a_newer_server", "message": "why"}})) is wire.BadMessage
    assert type(wire.error_of({"error": "not a map"})) is wire.BadMessage

    c, peer = remote.swarm, swarm[0].peer
    with pytest.raises(ServerFailed, match="unknown session") as lost:
        c.call(peer, "step", [torch.zeros(1, 1, 64)], {"session": "gone" * 4, "calls": [{"pos": 0}]})
    assert isinstance(lost.value.error, UnknownSession) and lost.value.session_lost
    with pytest.raises(ServerFailed, match="unknown operation") as bad:
        c.call(peer, "launch", [], {})
    assert isinstance(bad.value.error, wire.BadMessage) and not bad.value.session_lost


def test_a_session_the_server_let_go_is_rebuilt_there_without_a_ban(folder, local):
    """The only server of the span expires an idle session mid-generation: the client reopens it on the same server
    and replays (banning the server would leave no route)."""
    server, m = Server(folder, "--blocks", "0:4", "--session-timeout", "1"), None
    try:  # the server dies with the test whatever fails, its start too
        seen(folder, [server.wait()])
        m = remote_model(str(folder), [server.addr], **CLIENT)
        got = b""
        for i, b in enumerate(m.stream(PROMPT, 40, temperature=0)):
            got += b
            if i == 10:
                time.sleep(2.0)  # idle past --session-timeout: the next step finds the session gone
        assert got == local.generate(PROMPT, 40, temperature=0)
        assert m.swarm.stats["failovers"] >= 1 and not m.swarm.bans.banned(server.peer)
    finally:
        if m is not None:
            m.swarm.close()
        server.kill()


def test_payloads_over_the_unary_limit_are_streamed(remote, local, swarm):
    from bytelm.swarm import wire

    x = torch.randn(17, 512, 64)  # 2.1 MiB: over hivemind's 2 MiB unary limit, in chunks both ways
    assert wire.is_large(wire.pack([x], {})[0])
    sent = remote.swarm.stats["bytes_sent"]
    got = remote.swarm.stateless("forward", [x], 0, 2, prefer=swarm[0].peer)
    assert remote.swarm.stats["bytes_sent"] - sent > x.numel() * 4
    with torch.inference_mode():
        assert torch.allclose(got, local.global_model.run_blocks(x, 0, 2), atol=1e-5)


def test_work_over_a_servers_request_limit_is_sent_in_parts(remote, local, swarm):
    x = torch.randn(20, 512, 64)  # 10,240 rows x positions: over the servers' 10,000
    sent = remote.swarm.stats["messages"]
    got = remote.swarm.stateless("forward", [x], 0, 2, prefer=swarm[0].peer)
    assert remote.swarm.stats["messages"] - sent == 2  # 19 rows, then 1
    with torch.inference_mode():
        assert torch.allclose(got, local.global_model.run_blocks(x, 0, 2), atol=1e-5)
    # a decoding session's prefill of 20 rows x 500 positions goes in chunks of rows too; then a step of all rows
    session = remote.global_model.new_caches(20, 512, None, torch.float32)
    caches = local.global_model.new_caches(20, 512, torch.device("cpu"), torch.float32)
    try:
        for pos, t in [(0, 500), (500, 1)]:
            h = torch.randn(20, t, 64)
            step = Step.make(list(range(20)), [pos] * 20, pos + t, "cpu")
            got = session.step(h, step)
            with torch.inference_mode():
                assert torch.allclose(got, local.global_model.run_blocks(h, 0, 4, caches, step), atol=1e-4)
    finally:
        session.close()


def test_a_change_to_one_global_block_changes_the_swarm_name(folder, other):
    from bytelm.swarm.spans import fingerprints, load_span_fingerprinted

    a, b = fingerprints(folder), fingerprints(other)
    assert swarm_name(folder) != swarm_name(other)
    assert a.outside == b.outside and [x != y for x, y in zip(a.blocks, b.blocks, strict=True)] == [0, 0, 1, 0]
    # what a server announces is hashed from the tensors it loaded, and equals what a client reads from the file
    assert load_span_fingerprinted(other, 1, 4)[2] == list(b.blocks[1:])


def test_servers_of_other_weights_under_the_same_name_are_refused(folder, other, local, swarm, capsys):
    from bytelm.cli import main
    from bytelm.swarm import SwarmClient

    name = swarm_name(folder)
    # the other model's client, forced under this name: block 2 is held only by servers of other weights (1:4, 2:4)
    m = remote_model(str(other), [swarm[0].addr], swarm=name, **CLIENT)
    with pytest.raises(SwarmError, match=r"with this model's weights can serve blocks 0:4 .*refused 2 server\(s\) "
                                         r"of this swarm name with other weights"):
        m.generate(b"x", 4, temperature=0)
    m.swarm.close()
    # a server of the other weights, forced under this name and announced faster than any: never used
    impostor = Server(other, "--blocks", "0:4", "--swarm", name, "--initial-peers", swarm[0].addr, "--throughput",
                      "1000000").wait()
    try:
        seen(folder, [*swarm, impostor])
        honest = tuple(s.peer for s in swarm)
        blind = SwarmClient(name, 4, [swarm[0].addr], **CLIENT)  # without fingerprints the impostor would serve
        assert blind.route(0, 4, exclude=honest) == [(impostor.peer, 0, 4)]
        blind.close()
        m = remote_model(str(folder), [swarm[0].addr], **CLIENT)
        assert all(p != impostor.peer for p, _, _ in m.swarm.route(0, 4))
        assert m.swarm.others[impostor.peer][1] == [2]
        with pytest.raises(SwarmError, match=r"refused 1 server\(s\) of this swarm name with other weights"):
            m.swarm.route(0, 4, exclude=honest)
        assert m.generate(PROMPT, 32, temperature=0) == local.generate(PROMPT, 32, temperature=0)
        m.swarm.close()
        assert main(["swarm", "status", str(folder), "--initial-peers", swarm[0].addr]) == 0
        out = capsys.readouterr().out
        assert "3 server(s) online" in out and "1 server(s) under this name with other weights, refused" in out
        assert f"{impostor.peer}  blocks 0:4  mismatched fingerprints at block 2" in out
    finally:
        impostor.kill()


def test_one_peer_is_held_to_its_limits_while_others_are_served(folder, remote, swarm):
    from bytelm.swarm import SwarmClient

    peer = swarm[0].peer  # blocks 0:2, width 64, 64 MiB of cache: 32 MiB for one peer's sessions
    greedy = SwarmClient(swarm_name(folder), 4, [swarm[0].addr], **CLIENT)  # another peer id than `remote`'s
    spec = {"batch": 1, "max_len": 4, "start": 0, "end": 2}
    before = remote.swarm.info(peer)["sessions"]
    try:
        for i in range(16):
            greedy.call(peer, "open", [], {**spec, "session": f"greedy-{i:04d}"})
        with pytest.raises(ServerFailed, match=r"refused: this peer holds 16 sessions.*--max-sessions-per-peer 16"):
            greedy.call(peer, "open", [], {**spec, "session": "greedy-more"})
        # another peer is served meanwhile, and cannot touch the first one's sessions
        remote.swarm.call(peer, "open", [], {**spec, "session": "patient-0001"})
        with pytest.raises(ServerFailed, match="unknown session"):
            remote.swarm.call(peer, "step", [torch.zeros(1, 1, 64)],
                              {"session": "greedy-0000", "calls": [{"rows": [0], "pos": [0], "span": 1}]})
        remote.swarm.call(peer, "close", [], {"session": "patient-0001"})
        # 40 MiB fit in the server's free cache, not in one peer's share
        with pytest.raises(ServerFailed, match=r"over the 32.0 MiB one peer may hold \(--peer-cache-share 0.5"):
            remote.swarm.call(peer, "open", [], {**spec, "session": "patient-0002", "batch": 80, "max_len": 512})
        assert remote.swarm.info(peer)["sessions"] >= 16
    finally:
        greedy.close()
    # its peer gone, the server frees its sessions within seconds (not after --session-timeout)
    deadline = time.monotonic() + 20
    while remote.swarm.info(peer)["sessions"] > before:
        assert time.monotonic() < deadline, "a disconnected peer's sessions were kept"
        time.sleep(0.5)


def test_finetune_through_the_swarm_equals_local(remote, local, folder):
    from bytelm.finetune import load_adapter, save_adapter

    def run(model):
        torch.manual_seed(1)
        peft_model = swarm_lora(model, rank=4)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
        losses = []
        for _ in range(3):  # one batch again and again: its loss must go down
            loss = model.loss(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        state = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        return peft_model, losses, state

    local_copy = Megabyte.from_pretrained(folder)
    remote_peft, remote_losses, remote_state = run(remote)
    _, local_losses, local_state = run(local_copy)
    assert remote_state.keys() == local_state.keys() and any("global_embed" in k for k in remote_state)
    for k in local_state:
        assert torch.allclose(remote_state[k], local_state[k], atol=1e-5), k
    assert remote_losses == pytest.approx(local_losses, abs=1e-5)
    assert remote_losses[-1] < remote_losses[0]
    out = save_adapter(remote_peft, folder.parent / "adapter", remote.config, str(folder), None)
    whole = load_adapter(out, base=folder)  # the adapter on the whole model, held locally
    x = torch.randint(0, 256, (1, 40))
    assert torch.allclose(whole.loss(x), remote_peft.get_base_model().loss(x), atol=1e-5)


def test_a_server_killed_mid_generation_changes_nothing_and_a_late_joiner_is_used(folder, local):
    servers = [Server(folder, "--blocks", "0:4", "--throughput", "10")]  # announced slow: a faster one wins
    late = None
    try:  # every server dies with the test, whatever fails, their starts too
        servers.append(Server(folder, "--blocks", "0:4", "--throughput", "10", "--initial-peers",
                              servers[0].wait().addr))
        seen(folder, [s.wait() for s in servers])
        m = remote_model(str(folder), [servers[0].addr], **CLIENT)
        want = local.generate(PROMPT, 64, temperature=0)
        got, killed = b"", None
        for i, b in enumerate(m.stream(PROMPT, 64, temperature=0)):
            got += b
            if i == 20:  # kill -9 the server this generation runs on
                killed = next(s for s in servers if m.swarm.info(s.peer)["steps"] > 0)
                killed.kill()
        assert got == want
        assert m.swarm.stats["failovers"] >= 1 and m.swarm.stats["replayed_calls"] > 0
        # a server joining now, faster than the one left, takes the next generation
        late = Server(folder, "--blocks", "0:4", "--initial-peers", servers[0 if killed is servers[1] else 1].addr,
                      "--throughput", "1000000").wait()
        deadline = time.monotonic() + 30
        while m.swarm.route(0, 4) != [(late.peer, 0, 4)]:
            assert time.monotonic() < deadline, "the late server was never routed to"
            time.sleep(0.5)
        assert m.generate(PROMPT, 16, temperature=0) == local.generate(PROMPT, 16, temperature=0)
        assert m.swarm.info(late.peer)["steps"] > 0
        m.swarm.close()
    finally:
        for s in [*servers, late]:
            if s is not None:
                s.kill()


@pytest.mark.slow  # 13-23 s of processes and timeouts: `pytest -m slow` runs it (the suite's time budget)
def test_a_lying_server_is_caught_by_the_spot_check(folder, local):
    # the honest servers announce themselves slow (0.1 s for the span) and the liar fast, so every route starts with
    # the liar whatever the measured round trips (milliseconds apart on a busy machine) say
    honest = start(folder, ["0:4", "0:4"], "--throughput", "10")
    liar = None
    try:  # every server dies with the test, whatever fails, their starts too
        liar = Server(folder, "--blocks", "0:4", "--initial-peers", honest[0].addr, "--throughput", "1000000",
                      liar=True)
        seen(folder, [*honest, liar.wait()])
        m = remote_model(str(folder), [honest[0].addr], verify_fraction=1.0, **CLIENT)
        assert m.swarm.route(0, 4)[0][0] == liar.peer
        assert m.generate(PROMPT, 40, temperature=0) == local.generate(PROMPT, 40, temperature=0)
        assert m.swarm.liars == {liar.peer}
        m.swarm.close()
        unchecked = remote_model(str(folder), [honest[0].addr], **CLIENT)  # without the check, the lie gets through
        assert unchecked.generate(PROMPT, 40, temperature=0) != local.generate(PROMPT, 40, temperature=0)
        unchecked.swarm.close()
    finally:
        for s in [*honest, liar]:
            if s is not None:
                s.kill()


def test_no_server_for_a_span_is_one_clear_error(folder, capsys):
    from bytelm.cli import main

    servers = start(folder, ["0:2"])
    try:
        m = remote_model(str(folder), [servers[0].addr], **CLIENT)
        with pytest.raises(SwarmError, match="no server .* can serve blocks"):
            m.generate(b"x", 4, temperature=0)
        m.swarm.close()
        # the CLI: exit 2 and one line, never exit 0 with what little was generated
        assert main(["swarm", "generate", str(folder), "--initial-peers", servers[0].addr, "--prompt", "x",
                     "--max-bytes", "8", "--request-timeout", "10"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("bytelm swarm: error: generation failed after 0 bytes: no server") \
            and "can serve blocks" in err, err
    finally:
        servers[0].kill()


@pytest.mark.slow  # 13-23 s of processes and timeouts: `pytest -m slow` runs it (the suite's time budget)
def test_the_last_server_of_a_span_dying_mid_generation_fails_loudly(folder):
    # the real CLI as a process; its only server for the span is killed once output flows: exit 2 and one line
    # saying how far it got, never exit 0 with a truncated answer
    import subprocess

    servers = start(folder, ["0:4"])
    proc = subprocess.Popen([sys.executable, "-m", "bytelm.cli", "swarm", "generate", str(folder), "--initial-peers",
                             servers[0].addr, "--max-bytes", "1800", "--temperature", "0", "--no-echo",
                             "--request-timeout", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        got = b""
        while len(got) < 100:
            chunk = proc.stdout.read1(4096)
            assert chunk, proc.stderr.read().decode()
            got += chunk
        servers[0].kill()
        rest, err = proc.communicate(timeout=180)
        last = err.decode().strip().splitlines()[-1]
        assert proc.returncode == 2, err.decode()
        n = int(re.search(r"generation failed after (\d+) bytes", last)[1])
        assert last.startswith("bytelm swarm: error: ") and "the output above is incomplete" in last
        assert 0 < n < 1800  # (stdout holds more: the random model's bytes that are not UTF-8 print as U+FFFD)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for s in servers:
            s.kill()


@pytest.mark.slow  # 13-23 s of processes and timeouts: `pytest -m slow` runs it (the suite's time budget)
def test_two_servers_that_disagree_and_no_third_fail_the_generation_loudly(folder, capsys):
    # --verify-fraction 1 with one honest server and one liar for the span: nobody can say which is right, so the
    # generation stops with exit 2 and one line, never exit 0 with bytes that may be the liar's
    from bytelm.cli import main

    honest, liar = Server(folder, "--blocks", "0:4", "--throughput", "10"), None
    try:  # both die with the test, whatever fails, their starts too
        liar = Server(folder, "--blocks", "0:4", "--initial-peers", honest.wait().addr, "--throughput", "1000000",
                      liar=True)
        seen(folder, [honest, liar.wait()])
        assert main(["swarm", "generate", str(folder), "--initial-peers", honest.addr, "--prompt", "x",
                     "--max-bytes", "40", "--temperature", "0", "--verify-fraction", "1",
                     "--request-timeout", "10"]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("bytelm swarm: error: generation failed after ") and "disagree" in last, last
    finally:
        for s in (honest, liar):
            if s is not None:
                s.kill()


def test_status_lists_the_servers_and_the_gaps(folder, swarm, capsys):
    from bytelm.cli import main

    assert main(["swarm", "status", str(folder), "--initial-peers", swarm[0].addr]) == 0
    out = capsys.readouterr().out
    assert "3 server(s) online for 4 blocks" in out and "blocks nobody serves: none" in out
    assert all(s.peer in out for s in swarm) and "blocks 1:4" in out


def test_cli_errors_are_one_line(folder, capsys):
    from bytelm.cli import main

    for argv, why in [(["swarm"], "usage: bytelm swarm serve"),
                      (["swarm", "generate", str(folder), "--prompt", "x"], "name at least one peer"),
                      (["swarm", "serve", str(folder), "--blocks", "3:1"], "not a span of this model's 4 blocks"),
                      (["swarm", "serve", str(folder), "--blocks", "a:b"], "--blocks must be I:J"),
                      (["swarm", "finetune", str(folder)], "name at least one peer"),
                      (["swarm", "serve", str(folder), "--max-sessions-per-peer", "0"], "must be >= 1"),
                      (["swarm", "serve", str(folder), "--peer-cache-share", "2"], "must be in (0, 1]"),
                      (["swarm", "serve", str(folder), "--blocks", "0:4", "--max-request-tokens", "100"],
                       "at least the 512 positions of one whole row")]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert why in err and len(err.splitlines()) == 1, err


def test_routing_and_span_choice():
    from bytelm.swarm.registry import Bans, ServerInfo, choose_span, route

    def info(a, b, tp=100.0, free=1 << 30):
        return ServerInfo(a, b, tp, free)

    infos = {"A": info(0, 2), "B": info(2, 4), "C": info(0, 4, tp=100.0), "D": info(1, 3, tp=1e6)}
    assert route(infos, 0, 4) == [("C", 0, 4)]  # one hop beats two of the same speed
    assert route(infos, 0, 4, avoid=lambda p: p == "C") in ([("A", 0, 2), ("B", 2, 4)],
                                                             [("A", 0, 1), ("D", 1, 3), ("B", 3, 4)])
    assert route(infos, 0, 4, avoid=lambda p: p in "CB") == []  # nobody holds block 3
    assert ("C", 0, 4) not in route(infos, 0, 4, cache_per_block=1 << 29)  # C has room for 2 blocks' sessions
    assert route(infos, 0, 4, cache_per_block=1 << 31) == []  # nobody has room for one block's
    assert route(infos, 1, 3, rtt={"D": 1.0, "C": 0.001}) == [("C", 1, 3)]  # a far server costs its round trip
    assert choose_span({"A": info(0, 2), "C": info(0, 3)}, 4, 2) == (2, 4)  # block 3 is uncovered
    assert choose_span({}, 4, 9) == (0, 4)
    for bad in [{"start": 2, "end": 1, "throughput": 1.0, "cache_free": 0}, {"start": 0}, "x",
                {"start": 0, "end": 1, "throughput": float("nan"), "cache_free": 0},
                {"start": 0, "end": 1, "throughput": 1.0, "cache_free": 0, "state": "evil"},
                {"start": 0, "end": 2, "throughput": 1.0, "cache_free": 0, "fingerprints": ["0" * 16]},  # one of 2
                {"start": 0, "end": 1, "throughput": 1.0, "cache_free": 0, "fingerprints": ["X" * 16]},
                {"start": 0, "end": 1, "throughput": 1.0, "cache_free": 0, "fingerprints": "0" * 16},
                {"start": 0, "end": 1, "throughput": 1.0, "cache_free": 0, "fingerprints": [16]}]:
        assert ServerInfo.parse(bad) is None
    ok = ServerInfo.parse({"start": 1, "end": 3, "throughput": 1.0, "cache_free": 0, "fingerprints": ["a" * 16] * 2})
    assert ok.mismatches(["a" * 16, "b" * 16, "a" * 16, "a" * 16]) == [1]
    silent = ServerInfo.parse({"start": 1, "end": 3, "throughput": 1.0, "cache_free": 0})  # announces none
    assert silent.mismatches(["a" * 16] * 4) == [1, 2]
    bans = Bans(base=10.0)
    bans.ban("A")
    assert bans.banned("A") and not bans.banned("B")
    bans.ban("A")
    assert bans.until["A"] - time.monotonic() > 15  # doubled


def test_requests_are_split_by_size_and_history_keeps_only_live_rows():
    from bytelm.swarm.session import LiveRows, split

    def call(rows, pos):
        return {"rows": rows, "pos": pos, "span": 2, "lens": None}

    xs, calls = [torch.zeros(5, 2, 1), torch.zeros(1, 2, 1)], [call([0, 1, 2, 3, 4], [0] * 5), call([3], [4])]
    requests = split(xs, calls, 4)  # 2 rows of 2 positions fit in a request
    assert [[(j, x.shape[0], c["rows"]) for j, x, c in r] for r in requests] == [
        [(0, 2, [0, 1])], [(0, 2, [2, 3])], [(0, 1, [4]), (1, 1, [3])]]  # in order, the rest packed together
    live = LiveRows()
    assert live.add(call([0, 1], [0, 0])) == set() and live.add(call([0, 1], [1, 1])) == set()
    assert live.add(call([0], [0])) == set()  # row 1's caches still come from the first two calls
    assert live.add(call([1], [0])) == {0, 1}  # both rows rewritten from position 0: the first two calls go
    assert len(live) == 2


def test_the_openai_server_in_front_of_the_swarm(folder, local, swarm):
    pytest.importorskip("fastapi")
    from tests.test_serve import Server as HttpServer

    http = HttpServer(folder, "--initial-peers", swarm[0].addr)
    try:
        r = http.post("/v1/completions", {"model": str(folder), "prompt": "def ", "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200, r.text
        want = local.generate(b"def ", 24, temperature=0).decode("utf-8", errors="replace")
        assert r.json()["choices"][0]["text"] == want
    finally:
        http.kill()


def test_swarm_finetune_cli_lowers_validation_bpb(folder, swarm, tmp_path, capsys):
    from bytelm.cli import main
    from bytelm.finetune import load_adapter

    out = tmp_path / "ft"
    assert main(["swarm", "finetune", str(folder), "--initial-peers", swarm[0].addr, "--max-steps", "12", "--lr",
                 "1e-2", "--warmup-steps", "2", "--seq-len", "128", "--batch-size", "4", "--eval-interval", "12",
                 "--out-dir", str(out)]) == 0
    done = re.search(r"validation bpb ([\d.]+) \(the base: ([\d.]+)\)", capsys.readouterr().out)
    assert done and float(done[1]) < float(done[2]), done
    from safetensors import safe_open

    from bytelm.io import latest_checkpoint

    with safe_open(str(latest_checkpoint(out) / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any("global_embed" in n for n in names) and any("local_model" in n and "lora_A" in n for n in names)
    load_adapter(out, base=folder)  # the adapter loads on the whole model, like any other


@pytest.mark.slow  # 13-23 s of processes and timeouts: `pytest -m slow` runs it (the suite's time budget)
def test_a_server_that_hangs_is_timed_out_and_replaced(folder, local):
    servers = start(folder, ["0:4", "0:4"])
    try:
        m = remote_model(str(folder), [servers[0].addr], **{**CLIENT, "request_timeout": 3.0})
        got = b""
        for i, b in enumerate(m.stream(PROMPT, 40, temperature=0)):
            got += b
            if i == 10:  # freeze (SIGSTOP) the server in use: it neither answers nor closes its connections
                hung = next(s for s in servers if m.swarm.info(s.peer)["steps"] > 0)
                os.killpg(hung.proc.pid, signal.SIGSTOP)
        assert got == local.generate(PROMPT, 40, temperature=0)
        assert m.swarm.stats["failovers"] >= 1 and m.swarm.bans.banned(hung.peer)
        m.swarm.close()
    finally:
        for s in servers:
            s.kill()  # SIGKILL ends a stopped process too


def test_a_long_running_engine_keeps_a_bounded_history_and_survives_a_kill(folder, local):
    servers = start(folder, ["0:4", "0:4"])
    try:
        m = remote_model(str(folder), [servers[0].addr], **CLIENT)
        prompts = [b"import os\n", PROMPT, b"", b"class A:", b"x = [", b"def f(a, b):", b"# a comment\n", b"if x:"]
        params = SamplingParams(max_new_bytes=19, temperature=0)
        engine, got = Engine(m, max_streams=2), [bytearray() for _ in prompts]
        for i, p in enumerate(prompts):
            engine.submit(p, params, lambda o, i=i: got[i].extend(o.data))
        steps, killed = 0, False
        while engine.active or engine.queued:
            engine.step()
            steps += 1
            if steps == 60 and not killed:  # mid-way through the requests: kill -9 the server in use
                next(s for s in servers if m.swarm.info(s.peer)["steps"] > 0).kill()
                killed = True
        assert [bytes(g) for g in got] == [local.generate(p, 19, temperature=0) for p in prompts]
        session = engine.state.global_kv
        assert m.swarm.stats["failovers"] >= 1
        # the history holds what the 2 rows' caches need, not every global step the engine ran
        assert len(session.chain[0].history) < engine.state.global_steps / 2
    finally:
        for s in servers:
            s.kill()


@pytest.mark.parametrize("version, ok", [("0.6.0", True), ("0.6.12", True), ("0.7.0", True), ("0.5.3", False),
                                         ("1.0.0", False), ("", False), ("dev", False)])
def test_which_server_versions_take_this_clients_calls(version, ok):
    from bytelm.swarm.wire import speaks_our_wire

    assert speaks_our_wire(version) is ok


def test_servers_of_an_older_wire_are_left_out_and_named(remote, monkeypatch):
    # a server announcing a bytelm from before the Step calls would refuse every one: never routed to, and named
    from bytelm.swarm import peers
    from bytelm.swarm.registry import ServerInfo

    c = remote.swarm
    old = {"12D3KooWold0server": ServerInfo(0, c.depth, 100.0, 1 << 30, version="0.5.0")}
    monkeypatch.setattr(peers, "servers", lambda *a: old)
    try:
        assert c.refresh(force=True) == {} and list(c.old) == list(old)
        with pytest.raises(SwarmError, match=r"refused 1 server\(s\) running a bytelm whose calls differ .*0\.5\.0"):
            c.route(0, c.depth)
    finally:
        monkeypatch.undo()
        c.refresh(force=True)
    assert c.old == {} and c.infos
