"""Training: loss goes down on real data, exact resume, atomic checkpoints, data parallel equals one process."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import run_group

import bytelm
from bytelm import CheckpointError
from bytelm.training import TrainConfig, Trainer, lr_at


def tiny_cfg(tmp_path, code_dir, **kw) -> TrainConfig:
    base = dict(preset="tiny", data=[str(code_dir)], out_dir=str(tmp_path / "run"), seq_len=128, batch_size=4,
                max_steps=8, warmup_steps=2, log_interval=2, eval_interval=4, eval_batches=2, save_interval=4,
                sample_bytes=0, val_fraction=0.1, precision="fp32")  # fp32: these tests compare updates exactly
    return TrainConfig.flat(**{**base, **kw})


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_auto_precision_is_bf16_only_where_the_device_has_it(monkeypatch):
    from bytelm.training import precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert precision.uses_bf16("auto", cuda) and precision.uses_bf16("bf16", cpu)
    assert not precision.uses_bf16("fp32", cuda)
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        assert precision.uses_bf16("auto", cpu) is native
        assert isinstance(precision.autocast_for("auto", cpu), torch.autocast) is native


def test_lr_schedule():
    cfg = TrainConfig.flat(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 120))


def test_lr_schedule_ends_with_the_time_budget():
    # 100 s of budget with room for 10,000 steps: the time budget ends first, so the cosine follows the clock
    cfg = TrainConfig.flat(lr=1.0, warmup_steps=10, max_steps=10_000, min_lr_ratio=0.1, time_budget=100)
    assert lr_at(20, cfg, elapsed=50.0) == pytest.approx(0.55)
    assert lr_at(30, cfg, elapsed=100.0) == pytest.approx(0.1)
    assert lr_at(5, cfg, elapsed=99.0) == pytest.approx(0.6)  # warm-up is warm-up
    # steps end first: steps lead
    assert lr_at(10_000, cfg, elapsed=1.0) == pytest.approx(0.1)


def test_wsd_schedule():
    cfg = TrainConfig.flat(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(s, cfg) for s in (10, 50, 90)] == [1.0, 1.0, 1.0]  # stable until 80% of the way
    assert lr_at(100, cfg) == pytest.approx(0.5) and lr_at(110, cfg) == pytest.approx(0.0)
    timed = TrainConfig.flat(lr=1.0, warmup_steps=0, max_steps=10_000, min_lr_ratio=0.0, schedule="wsd", time_budget=10)
    assert lr_at(50, timed, elapsed=9.0) == pytest.approx(0.5)
    with pytest.raises(bytelm.ConfigError, match="schedule must be one of cosine, wsd"):
        TrainConfig.flat(schedule="linear")


def test_a_time_budgeted_run_ends_with_its_learning_rate_decayed(tmp_path, code_dir):
    # no --max-steps: with a time budget the budget alone ends the run (and its schedule)
    cfg = tiny_cfg(tmp_path, code_dir, max_steps=0, warmup_steps=2, time_budget=3.0, log_interval=1,
                   eval_interval=100_000, save_interval=100_000, lr=1e-3, min_lr_ratio=0.1)
    assert cfg.step_limit is None and TrainConfig().step_limit == 600 and TrainConfig.flat(max_steps=7).step_limit == 7
    Trainer(cfg, log=lambda *_: None).run()
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r["split"] == "train"]
    lrs = [float(r["lr"]) for r in rows]
    assert len(lrs) > 10 and lrs[-1] < 1.3e-4  # ~min_lr at the end of the budget (one step's worth of time above)
    assert lrs[len(lrs) // 2] > 4e-4  # half way through, half way down the cosine (not at its start or end)


def test_loss_goes_down_on_real_code(tmp_path, code_dir):
    cfg = tiny_cfg(tmp_path, code_dir, max_steps=80, warmup_steps=10, lr=3e-3, eval_interval=80, save_interval=80)
    trainer = Trainer(cfg, log=lambda *_: None)
    before = trainer.estimate_val()
    result = trainer.run()
    assert before > 5.0  # ~ln(256) = 5.5 nats at init
    assert result["val_loss"] < before - 1.0
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,split,loss,bpb,lr,bytes_per_s,elapsed_s" and len(rows) == 1 + 40 + 1
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["train"]["schedule"]["max_steps"] == 80 and run["model"]["model_type"] == "megabyte"
    assert "split by file" in run["data"]


@pytest.mark.parametrize("model_type", ["megabyte", "transformer"])
def test_resume_equals_uninterrupted(tmp_path, code_dir, model_type):
    a = Trainer(tiny_cfg(tmp_path / "a", code_dir, model_type=model_type), log=lambda *_: None)
    a.run()
    b = Trainer(tiny_cfg(tmp_path / "b", code_dir, model_type=model_type), log=lambda *_: None)
    b.run(until_step=4)  # "killed" after the step-4 checkpoint
    del b
    c = Trainer(tiny_cfg(tmp_path / "b", code_dir, model_type=model_type), resume=True, log=lambda *_: None)
    assert c.step == 4
    c.run()
    wa, wc = weights(a.model), weights(c.model)
    assert all(torch.equal(wa[k], wc[k]) for k in wa), "resumed run diverged from the uninterrupted one"
    assert not all(torch.equal(wa[k], weights(bytelm.load(tmp_path / "b" / "run" / "checkpoints" / "step-0000004"))[k])
                   for k in wa)
    # metrics of the resumed run are not duplicated
    steps = [line.split(",")[0:2] for line in (tmp_path / "b" / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert len(steps) == len({tuple(s) for s in steps})


def test_compile_that_fails_warns_once_and_trains_eager(tmp_path, code_dir, monkeypatch):
    def broken(fn, *args, **kwargs):  # what a missing compiler or an unsupported op looks like at the first call
        def call(*a, **k):
            raise RuntimeError("no C++ compiler\nmore detail")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    lines = []
    eager = Trainer(tiny_cfg(tmp_path / "a", code_dir, max_steps=4), log=lambda *_: None)
    eager.run()
    trainer = Trainer(tiny_cfg(tmp_path / "b", code_dir, max_steps=4, compile=True), log=lines.append)
    trainer.run()
    warnings = [line for line in lines if "torch.compile failed" in line]
    assert warnings == ["warning: torch.compile failed (RuntimeError: no C++ compiler); training uncompiled"]
    we, wt = weights(eager.model), weights(trainer.model)
    assert all(torch.equal(we[k], wt[k]) for k in we)  # the failed attempt left nothing behind
    assert not any("_orig_mod" in k for k in bytelm.load(tmp_path / "b" / "run").state_dict())


def test_kill_during_checkpoint_write_leaves_previous_loadable(tmp_path, code_dir, monkeypatch):
    cfg = tiny_cfg(tmp_path, code_dir)
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.run(until_step=4)
    good = weights(trainer.model)

    import bytelm.training.trainer as train_mod

    def killed(*args, **kwargs):  # the process dies after the model is written, before the optimizer state
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(train_mod, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(until_step=8)
    monkeypatch.undo()
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    loaded = bytelm.load(run)  # a run folder loads its latest complete checkpoint
    assert all(torch.equal(loaded.state_dict()[k], good[k]) for k in good)
    resumed = Trainer(cfg, resume=True, log=lambda *_: None)
    assert resumed.step == 4
    resumed.run()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000008"
    assert not list((run / "checkpoints").glob(".*.tmp"))  # the half-written folder was replaced


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path, code_dir):
    cfg = tiny_cfg(tmp_path, code_dir, max_steps=4)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        Trainer(cfg, resume=True)
    Trainer(cfg, log=lambda *_: None).run()
    with pytest.raises(CheckpointError, match="already holds a run; pass --resume"):
        Trainer(cfg)


def test_grad_accumulation_equals_a_bigger_batch(tmp_path, code_dir):
    """2 micro-batches of 2 windows give the same update as one batch of 4 (the sampler draws the same windows).
    Compared under AdamW: Muon orthogonalises in bf16 (torch.optim.Muon), which turns the gradients' float-rounding
    differences into bf16 rounding flips (~1e-3 after 3 steps), so it could only be compared loosely."""
    one = Trainer(tiny_cfg(tmp_path / "one", code_dir, batch_size=4, max_steps=3, optimizer="adamw"),
                  log=lambda *_: None)
    two = Trainer(tiny_cfg(tmp_path / "two", code_dir, batch_size=2, grad_accum=2, max_steps=3, optimizer="adamw"),
                  log=lambda *_: None)
    one.run()
    two.run()
    w1, w2 = weights(one.model), weights(two.model)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


@pytest.mark.skipif(sys.platform == "win32", reason="gloo over localhost")
def test_ddp_two_processes_match_one(tmp_path, code_dir):
    """torchrun with 2 CPU processes x 2 windows equals 1 process x 4 windows: same weights after 4 steps."""
    common = ["--preset", "tiny", "--data", str(code_dir), "--seq-len", "64", "--max-steps", "4",
              "--warmup-steps", "1", "--save-interval", "4", "--eval-interval", "4", "--eval-batches", "1",
              "--sample-bytes", "0", "--val-fraction", "0.1", "--precision", "fp32",  # fp32: compared exactly
              "--optimizer", "adamw"]  # and AdamW: see test_grad_accumulation_equals_a_bigger_batch
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "bytelm.cli", "train", *common, "--batch-size", "4",
                             "--out-dir", str(tmp_path / "single")], capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    ddp = run_group([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                     "29517", "-m", "bytelm.cli", "train", *common, "--batch-size", "2",
                     "--out-dir", str(tmp_path / "ddp")], env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "global batch 2x1x2 windows" in ddp.stdout
    a, b = bytelm.load(tmp_path / "single"), bytelm.load(tmp_path / "ddp")
    sa, sb = a.state_dict(), b.state_dict()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-4
    torch.manual_seed(1337)  # the trainer's seed: the same initial weights
    start = bytelm.build(a.config)
    assert max((sa[k] - start.state_dict()[k]).abs().max().item() for k in sa) > 1e-3  # it did train


def test_local_stack_learns_at_its_own_rate(tmp_path, code_dir):
    trainer = Trainer(tiny_cfg(tmp_path, code_dir, local_lr_scale=3.0, max_steps=3), log=lambda *_: None)
    trainer.run()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for g in trainer.optimizer.param_groups:
        local = {names[id(p)].startswith(("local_", "lm_head")) for p in g["params"]}
        assert len(local) == 1  # a group is all local or all global
        assert g["lr_scale"] == (3.0 if local.pop() else 1.0)
        assert g["lr"] == pytest.approx(trainer.lr * g["lr_scale"])
    # Muon: the blocks' matrices, local or not; AdamW: the rest, decayed or not, local or not
    assert len(trainer.optimizer.param_groups) == 6
    by_muon = {names[id(p)] for g in trainer.optimizer.parts["muon"].param_groups for p in g["params"]}
    block_matrices = {n for n, p in trainer.model.named_parameters() if ".blocks." in n and p.dim() == 2}
    assert by_muon == block_matrices and any(n.startswith("local_model") for n in by_muon)
    transformer = Trainer(tiny_cfg(tmp_path / "t", code_dir, model_type="transformer"), log=lambda *_: None)
    assert [g["lr_scale"] for g in transformer.optimizer.param_groups] == [1.0, 1.0, 1.0]  # one stack: one rate
    adamw = Trainer(tiny_cfg(tmp_path / "a", code_dir, optimizer="adamw"), log=lambda *_: None)
    assert isinstance(adamw.optimizer, torch.optim.AdamW) and len(adamw.optimizer.param_groups) == 4


def test_resume_with_other_parameter_groups_is_one_clear_error(tmp_path, code_dir):
    Trainer(tiny_cfg(tmp_path, code_dir, local_lr_scale=1.0), log=lambda *_: None).run(until_step=4)  # 3 groups
    with pytest.raises(CheckpointError, match="optimizer state does not fit this run's optimizer"):
        Trainer(tiny_cfg(tmp_path, code_dir, local_lr_scale=2.0), resume=True, log=lambda *_: None)  # 6 groups
    with pytest.raises(CheckpointError, match="optimizer state does not fit .* --optimizer"):
        Trainer(tiny_cfg(tmp_path, code_dir, local_lr_scale=1.0, optimizer="adamw"), resume=True,
                log=lambda *_: None)  # a Muon + AdamW state, read by AdamW alone


def test_muon_newton_schulz_in_fp32_matches_torchs_bf16():
    # CPUs without bf16 matrix instructions run Muon's orthogonalisation in fp32 (Fp32Muon): the same iteration
    import torch.optim._muon as muon_module

    from bytelm.training.optim import Fp32Muon, newton_schulz_fp32

    torch.manual_seed(0)
    coeffs = torch.optim.Muon([torch.nn.Parameter(torch.zeros(2, 2))]).defaults["ns_coefficients"]
    for shape in ((64, 256), (256, 64)):
        g = torch.randn(shape)
        ref = muon_module._zeropower_via_newtonschulz(g, coeffs, 5, 1e-7).float()
        got = newton_schulz_fp32(g, coeffs, 5, 1e-7)
        assert got.dtype == torch.float32 and got.shape == g.shape
        assert (got - ref).norm() / ref.norm() < 0.02  # bf16 rounding
    torch_fn = muon_module._zeropower_via_newtonschulz
    start = torch.randn(32, 48)
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    for p in (a, b):
        p.grad = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    torch.optim.Muon([a], lr=0.1, adjust_lr_fn="match_rms_adamw").step()
    Fp32Muon([b], lr=0.1, adjust_lr_fn="match_rms_adamw").step()
    ua, ub = a.detach() - start, b.detach() - start
    assert (ua - ub).norm() / ua.norm() < 0.02 and not torch.equal(ua, ub)  # the same update, to bf16 rounding
    assert muon_module._zeropower_via_newtonschulz is torch_fn  # restored after the step
