"""Dynamic patching (MegabyteConfig.patching = "space" | "entropy") through every user path: `bytelm generate`,
`bytelm eval`, `bytelm train` (and --resume), `bytelm serve`, the swarm, and an old config.json without the field.
The model-level invariants (causal, cached == full, batched == alone) are conftest.py's CONFIGS; here each path must
give what the model itself gives, on models whose patches really are not every P bytes."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import engine_outputs

import bytelm
from bytelm import CheckpointError, Megabyte, MegabyteConfig
from bytelm.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

RULES = {"space": dict(patching="space"), "entropy": dict(patching="entropy", patch_threshold=0.05)}
PROMPT = b"def main(argv):\n    return "
TEXT = (b"The quick brown fox jumps over the lazy dog; 42 + 17 = 59.\n"
        b"def f(x): return [y * 2 for y in x if y % 3]  # caf\xc3\xa9\n") * 5


def build(**fields) -> Megabyte:
    torch.manual_seed(0)
    model = Megabyte(MegabyteConfig.from_name("tiny", max_seq_len=256, **fields))
    if fields.get("patching") == "entropy":  # an untrained entropy model's entropies are all equal (conftest.make)
        with torch.no_grad():
            model.entropy_model.head.weight.mul_(30)
    return model.eval()


def assert_dynamic(model: Megabyte, b: bytes) -> None:
    """The model's patches of b are not MEGABYTE's fixed ones: the path under test does exercise dynamic patches."""
    ends = model.patch_ends(torch.tensor([list(b)]))[0]
    P = model.config.patch_size
    assert not torch.equal(ends, torch.arange(len(b)) % P == P - 1), ends


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, Megabyte]]:
    root = tmp_path_factory.mktemp("patching")
    out = {}
    for rule, fields in RULES.items():
        model = build(**fields)
        model.save_pretrained(root / rule)
        out[rule] = root / rule, model
    return out


def test_saved_dynamic_models_load_with_their_rule(saved):
    for rule, (folder, model) in saved.items():
        loaded = bytelm.load(folder)
        assert loaded.config.patching == rule and loaded.config == model.config
        x = torch.tensor([list(TEXT[:100])])
        assert_dynamic(loaded, TEXT[:100])
        assert torch.equal(loaded.patch_ends(x), model.patch_ends(x))  # the entropy model's weights came along
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("rule", list(RULES))
def test_generate_cli_greedy_equals_model_generate(saved, rule, tmp_path):
    folder, model = saved[rule]
    want = model.generate(PROMPT, 48, temperature=0)
    assert_dynamic(model, PROMPT + want)
    assert main(["generate", str(folder), "--prompt", PROMPT.decode(), "--max-bytes", "48", "--temperature", "0",
                 "--out", str(tmp_path / "g.bin")]) == 0
    assert (tmp_path / "g.bin").read_bytes() == want


@pytest.mark.parametrize("rule", list(RULES))
def test_eval_cli_bpb_is_model_loss(saved, rule, tmp_path, capsys):
    folder, model = saved[rule]
    text = TEXT[:300]
    (tmp_path / "text.txt").write_bytes(text)
    assert main(["eval", str(folder), "--data", str(tmp_path / "text.txt"), "--json", "--seq-len", "128",
                 "--no-codecs"]) == 0
    res = json.loads(capsys.readouterr().out)
    nats = 0.0
    with torch.no_grad():  # chunked windows of 128 bytes, each scored from its own start: 128, 128, 44
        for s in range(0, 300, 128):
            nats += float(model.loss(torch.tensor([list(text[s : s + 128])]), reduction="sum"))
    assert res["bytes"] == 300
    assert res["bpb"] == pytest.approx(nats / (math.log(2) * 300), rel=1e-5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py", root / "textwrap.py")  # ~20 KB of Python
    return root


@pytest.mark.parametrize("rule", list(RULES))
def test_train_cli_trains_resumes_and_saves_a_dynamic_run(rule, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    model_flags = ["--model", *(f"{k}={v}" for k, v in RULES[rule].items()), "max_seq_len=256"]
    common = ["--data", str(corpus), "--out-dir", str(out), "--sample-bytes", "0"]
    assert main(["train", "--preset", "tiny", *model_flags, *common, "--seq-len", "64", "--batch-size", "2",
                 "--max-steps", "2", "--warmup-steps", "1", "--lr", "3e-3", "--log-interval", "1",
                 "--eval-interval", "2", "--save-interval", "2", "--eval-batches", "1", "--val-fraction", "0.2",
                 "--precision", "fp32"]) == 0
    at_2 = bytelm.load(out)
    assert at_2.config.patching == rule
    assert main(["train", "--resume", *common, "--max-steps", "4"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    trained = bytelm.load(out)
    assert trained.config == at_2.config and trained.config.patching == rule
    assert json.loads((out / "run.json").read_text())["model"]["patching"] == rule
    now, mid = trained.state_dict(), at_2.state_dict()
    changed = {k for k in now if not torch.equal(now[k], mid[k])}
    assert any(k.startswith("global_model.") for k in changed)  # the resumed run trained on
    assert any(k.startswith("entropy_model.") for k in now) == (rule == "entropy")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_entropy_model_learns_alongside_in_training(corpus, tmp_path, checkpointing):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--model", "patching=entropy", "patch_threshold=0.05",
                 "max_seq_len=256", "--data", str(corpus), "--out-dir", str(out), "--sample-bytes", "0",
                 "--seq-len", "64", "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", "--lr", "3e-3",
                 "--eval-interval", "2", "--save-interval", "2", "--eval-batches", "1", "--val-fraction", "0.2",
                 "--precision", "fp32", *(["--activation-checkpointing"] if checkpointing else [])]) == 0
    trained = bytelm.load(out)
    torch.manual_seed(1337)  # the trainer's seed: its initial weights
    start = bytelm.build(trained.config).state_dict()
    head = "entropy_model.head.weight"
    # every step moves each entry of its output head by about the learning rate (AdamW), far past what weight
    # decay alone would (lr * 0.1 * |w| ~ 1e-5)
    moved = (trained.state_dict()[head] - start[head]).abs().mean()
    assert moved > 1e-3, moved
    # while the loss MEGABYTE reports is its own next-byte loss alone, gradients on or off
    trained.train()
    x = torch.tensor([list(TEXT[:64])])
    own = F.cross_entropy(trained(x)[0], x[0])
    torch.testing.assert_close(trained.loss(x), own)
    with torch.no_grad():
        torch.testing.assert_close(trained.loss(x), own)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_greedy_completion_equals_model_generate(saved):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    folder, model = saved["entropy"]
    want = model.generate(PROMPT, 40, temperature=0)
    assert_dynamic(model, PROMPT + want)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "bytelm.cli", "serve", str(folder), "--port", str(port),
                             "--log-level", "warning", "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not start in 60 s"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": str(folder), "prompt": PROMPT.decode(), "max_tokens": 40, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want.decode("utf-8", errors="replace")
        # two at once: the server's engine batches them, rows whose patches end at different bytes
        other = b"x = 1\n"
        both = [httpx.post(url + "/v1/completions", json={**body, "prompt": p.decode()}, timeout=60)
                for p in (other, PROMPT)]
        assert [b.json()["choices"][0]["text"] for b in both] == [
            model.generate(p, 40, temperature=0).decode("utf-8", errors="replace") for p in (other, PROMPT)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_swarm_generation_and_engine_batch_equal_local(saved):
    pytest.importorskip("hivemind")
    pytest.importorskip("peft")
    from benchmarks.swarm import Server
    from bytelm.generation.engine import SamplingParams
    from bytelm.swarm import SwarmClient, remote_model, swarm_name

    folder, local = saved["space"]
    server = Server(folder, "--blocks", "0:2", "--announce-period", "2", "--max-cache-mb", "64")
    remote = None
    try:
        server.wait()
        client = SwarmClient(swarm_name(folder), 2, [server.addr])  # wait until the DHT shows it (test_swarm.seen)
        try:
            deadline = time.monotonic() + 30
            while server.peer not in set(client.refresh(force=True)):
                assert time.monotonic() < deadline, "server never showed up in the DHT"
                time.sleep(0.2)
        finally:
            client.close()
        remote = remote_model(str(folder), [server.addr], request_timeout=10.0, refresh_period=0.2,
                              ban_seconds=30.0)
        assert remote.config.patching == "space"
        want = local.generate(PROMPT, 40, temperature=0)
        assert_dynamic(local, PROMPT + want)
        assert remote.generate(PROMPT, 40, temperature=0) == want
        # a continuous batch: rows at different positions, whose patches end at different bytes (row subsets)
        prompts = [b"", b"import os, sys\n", PROMPT]
        params = SamplingParams(max_new_bytes=21, temperature=0)
        got = engine_outputs(remote, prompts, params, 3)
        assert got == [local.generate(p, 21, temperature=0) for p in prompts]
    finally:
        if remote is not None:
            remote.swarm.close()
        server.kill()


def test_old_config_without_patching_loads_as_fixed(tmp_path):
    model = build()
    model.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    cfg = json.loads(path.read_text())
    for name in ("patching", "patch_threshold", "entropy_dim", "entropy_layers"):
        del cfg[name]
    cfg["bytelm_version"] = "0.7.0"  # written before the fields existed: they take the design it was written with
    path.write_text(json.dumps(cfg))
    old = bytelm.load(tmp_path / "old")
    assert old.config.patching == "fixed" and old.config == model.config and not hasattr(old, "entropy_model")
    x = torch.tensor([list(TEXT[:64])])
    with torch.no_grad():
        torch.testing.assert_close(old(x), model(x), atol=0, rtol=0)
    assert old.generate(PROMPT, 24, temperature=0) == model.generate(PROMPT, 24, temperature=0)
    cfg["bytelm_version"] = "0.8.0"  # written after they existed: a config that lacks one is broken, not old
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lacks field"):
        bytelm.load(tmp_path / "old")
