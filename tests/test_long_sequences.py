"""Long sequences: the chunked loss with activation checkpointing (bytelm.training.enable_activation_checkpointing)
gives the loss and gradients of the plain path, chunk boundaries anywhere; the trainer takes it; and the memory
estimate counts one chunk, not the whole sequence, so a 1,048,576-byte step that fits is not refused.

Tolerance: fp32 throughout; the chunked loss sums per-chunk sums where the plain one takes one mean, and checkpointed
blocks recompute the same kernels on the same inputs, so the two agree to float rounding: rtol 1e-5, atol 1e-6 (a
chunk boundary off by one byte or patch moves the loss by ~1e-3 and some gradients by far more).
"""

from __future__ import annotations

import copy

import pytest
import torch

import bytelm
from bytelm.models import MegabyteConfig, TransformerConfig, byte_loss, memory
from bytelm.training import TrainConfig, Trainer
from bytelm.training.memory import training_parts
from bytelm.training.trainer import enable_activation_checkpointing

TOL = dict(rtol=1e-5, atol=1e-6)
B = 2  # rows: a chunk covers patches of every row, so chunk_bytes // (B * P) patches


def plain_and_chunked(cfg, chunk_bytes: int):
    torch.manual_seed(0)
    plain = bytelm.build(cfg).train()
    chunked = copy.deepcopy(plain)
    enable_activation_checkpointing(chunked, chunk_bytes)
    calls = []
    real = chunked.recompute
    chunked.recompute = lambda fn, i, j: (calls.append((i, j)), real(fn, i, j))[1]
    return plain, chunked, calls


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(plain, chunked, x):
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(chunked(x, loss=reduction), byte_loss(plain(x), x, reduction), **TOL)
    ref = grads(plain, byte_loss(plain(x), x))
    got = grads(chunked, chunked.loss(x))
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


MEGABYTES = {
    "paper local model (W=0)": dict(local_context=0),
    "W < P": dict(local_context=2),
    "W > P, context_global": dict(local_context=6, context_global=True),  # windows reach 2 patches back
    "W = P, context_global, learned positions": dict(local_context=4, context_global=True, pos_emb="learned"),
}


@pytest.mark.parametrize("overrides", MEGABYTES.values(), ids=MEGABYTES.keys())
@pytest.mark.parametrize("T", [61, 64], ids=["T not a multiple of P", "T = 16 patches"])
@pytest.mark.parametrize("patches", [1, 3, 4, 100], ids=["1 patch a chunk", "3 (not dividing K)", "4 (dividing K)",
                                                         "all in one"])
def test_megabyte_chunked_loss_and_gradients_are_the_plain_ones(overrides, T, patches):
    cfg = MegabyteConfig.from_name("tiny", max_seq_len=64, **overrides)
    P = cfg.patch_size
    plain, chunked, calls = plain_and_chunked(cfg, patches * B * P)
    x = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(1))
    assert_same(plain, chunked, x)
    K = -(-T // P)
    step = min(patches, K)
    assert calls[:-(-K // step)] == [(i, min(i + step, K)) for i in range(0, K, step)]  # really chunked


def test_megabyte_chunks_never_hold_more_than_their_logits():
    # the head sees one chunk's bytes at a time: never the (B, T, 256) logits
    cfg = MegabyteConfig.from_name("tiny", max_seq_len=256, local_context=6, context_global=True)
    _, chunked, _ = plain_and_chunked(cfg, 3 * B * cfg.patch_size)
    rows = []
    chunked.lm_head.register_forward_hook(lambda m, args, out: rows.append(out.shape[0] * out.shape[1]))
    chunked.loss(torch.randint(0, 256, (B, 250))).backward()
    assert max(rows) == 3 * B * cfg.patch_size and len(rows) == 2 * 21  # 21 chunks of 63 patches, each run twice


@pytest.mark.parametrize("positions", [1, 7, 16, 1000], ids=["1", "7 (not dividing T)", "16 (dividing T)", "all"])
def test_byte_transformer_chunked_loss_and_gradients_are_the_plain_ones(positions):
    plain, chunked, calls = plain_and_chunked(TransformerConfig.from_name("tiny", max_seq_len=64), positions * B)
    x = torch.randint(0, 256, (B, 48), generator=torch.Generator().manual_seed(2))
    assert_same(plain, chunked, x)
    step = min(positions, 48)
    assert calls[:-(-48 // step)] == [(i, min(i + step, 48)) for i in range(0, 48, step)]


def test_chunked_loss_without_grad_is_the_plain_loss():
    # evaluation under no_grad takes the chunked path too (nothing to recompute): the same numbers
    plain, chunked, _ = plain_and_chunked(MegabyteConfig.from_name("tiny", local_context=3), 24)
    x = torch.randint(0, 256, (B, 57))
    with torch.no_grad():
        torch.testing.assert_close(chunked.loss(x, "none"), plain.loss(x, "none"), **TOL)


def test_the_trainer_with_activation_checkpointing_takes_the_same_step(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(torch.randint(0, 256, (20_000,), generator=torch.Generator().manual_seed(3)).tolist()))
    results = []
    for checkpointing in (False, True):
        cfg = TrainConfig.flat(preset="tiny", data=[str(data)], out_dir=str(tmp_path / f"run-{checkpointing}"),
                               seq_len=125, batch_size=2, max_steps=2, warmup_steps=1, precision="fp32", sample_bytes=0,
                               activation_checkpointing=checkpointing)
        t = Trainer(cfg, log=lambda *_: None)
        calls = []
        if checkpointing:
            assert t.model.loss_chunk_bytes is not None
            t.model.loss_chunk_bytes = 3 * 2 * t.model.config.patch_size  # chunks of 3 patches: boundaries inside
            real = t.model.recompute
            t.model.recompute = lambda fn, i, j, real=real, calls=calls: (calls.append(i), real(fn, i, j))[1]
        loss = t.train_step()
        results.append((loss, {n: p.detach().clone() for n, p in t.model.named_parameters()}))
        assert len(calls) == (11 if checkpointing else 0)  # 32 patches in chunks of 3, forward and backward
    (loss0, w0), (loss1, w1) = results
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for name in w0:  # the same gradients make the same update
        torch.testing.assert_close(w1[name], w0[name], rtol=1e-5, atol=1e-6)


LONG = MegabyteConfig(max_seq_len=1 << 20, patch_size=32, global_dim=256, global_layers=4, global_heads=4,
                      local_dim=64, local_layers=2, local_heads=2)  # benchmarks/suites.py's long_train_megabyte


def test_the_estimate_with_checkpointing_counts_one_chunk_at_a_time():
    acts = memory.training_activations(LONG, 1 << 20)
    # without: every local activation and the whole logits (~20 GB); with: the global model's block inputs and one
    # block, and one 64 KiB chunk's local model and logits, whatever the length
    assert acts.saved > 15e9
    assert acts.chunk < 1.5e9 and acts.nbytes(1, True) < 2.5e9
    # a chunk's activations do not grow with the length (but for the views of whole-sequence byte indices it reads)
    assert memory.training_activations(LONG, 1 << 19).chunk == pytest.approx(acts.chunk, rel=0.02)


def test_a_million_byte_step_that_fits_is_not_refused(monkeypatch):
    from bytelm.devices import check_memory
    from bytelm.errors import MemoryLimitError

    monkeypatch.setenv("BYTELM_MEMORY_LIMIT", "20GB")  # this project's 24 GB machine, less what else runs on it

    def need(checkpointing):
        return sum(n for _, n in training_parts(LONG, 1, 1 << 20, "muon", "fp32", torch.device("cpu"), checkpointing))

    check_memory(need(True), "cpu", "this run")
    with pytest.raises(MemoryLimitError):
        check_memory(need(False), "cpu", "this run")
