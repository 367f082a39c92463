"""`--parallel fsdp` (FSDP2) under torchrun with 2 CPU processes over gloo: a step equals one process's (AdamW and
Muon), sharded checkpoints reshard (a 2-rank run resumes on 1 rank and a 1-rank run on 2, to the weights of an
uninterrupted run), a kill -9 leaves a checkpoint that resumes to the uninterrupted run's weights, and each rank
holds about half the training state.

Tolerances: after 4 steps the weights of 2 ranks and of 1 process differed by at most 4e-6 (AdamW) and 1e-6 (Muon)
here: the gradients are summed in another order (a reduce-scatter over 2 ranks against one backward over the whole
batch), and AdamW divides by the square root of a second moment that starts near zero, which magnifies float
rounding in the first steps. 5e-5 leaves room for other CPUs and BLAS builds, and is 100x below what one step moves
a weight (asserted too)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import kill_tree, run_group

import bytelm
from bytelm import CheckpointError
from bytelm.cli import main as cli_main
from bytelm.training import TrainConfig, Trainer

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TOL = 5e-5

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo over localhost")


def settings(out: Path, code_dir: Path, **kw) -> dict:
    """A run's settings as TrainConfig's fields; `batch_size` is per process (4 windows a step in all)."""
    return {"preset": "tiny", "data": [str(code_dir)], "out_dir": str(out), "seq_len": 64, "batch_size": 4,
            "max_steps": 4, "warmup_steps": 1, "log_interval": 2, "eval_interval": 4, "eval_batches": 1,
            "save_interval": 2, "sample_bytes": 0, "val_fraction": 0.1, "precision": "fp32", "optimizer": "adamw",
            "parallel": "fsdp", **kw}


def run_here(s: dict, resume: bool = False) -> Trainer:
    trainer = Trainer(TrainConfig.from_dict(s), resume=resume, log=lambda *_: None)
    trainer.run()
    return trainer


def torchrun(args: list[str], port: int, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port), *args]
    if kw.pop("background", False):
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    done = run_group(cmd, env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def rolled_back(run: Path, to: Path, step: int) -> Path:
    """A copy of `run` whose `latest` names an earlier checkpoint: resuming it redoes the steps after that one."""
    shutil.copytree(run, to)
    (to / "checkpoints" / "latest").write_text(f"step-{step:07d}\n")
    return to


def gap(a: Path, b: Path) -> float:
    sa, sb = bytelm.load(a).state_dict(), bytelm.load(b).state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, code_dir) -> dict[str, Path]:
    """One process: the uninterrupted runs (DDP's one-process path, and fsdp's); then one torchrun of 2 ranks: the
    same runs sharded, a 1-rank fsdp run resumed on 2 ranks, and a measure of each rank's training state; last, a
    2-rank run resumed on 1 rank."""
    root = tmp_path_factory.mktemp("fsdp")
    names = ("one_adamw", "one_muon", "one_fsdp", "two_adamw", "two_muon", "two_bf16", "up", "down")
    out = {name: root / name for name in names}
    run_here(settings(out["one_adamw"], code_dir, parallel="ddp"))
    run_here(settings(out["one_muon"], code_dir, parallel="ddp", optimizer="muon"))
    run_here(settings(out["one_fsdp"], code_dir))
    rolled_back(out["one_fsdp"], out["up"], 2)
    jobs = [{"settings": settings(out["two_adamw"], code_dir, batch_size=2)},
            {"settings": settings(out["two_muon"], code_dir, batch_size=2, optimizer="muon")},
            {"settings": settings(out["two_bf16"], code_dir, batch_size=2, precision="bf16")},
            {"settings": settings(out["up"], code_dir, batch_size=2), "resume": True},
            {"measure": settings(root / "measure", code_dir, batch_size=2, optimizer="muon"),
             "out": str(root / "bytes")}]
    done = torchrun([str(HERE / "fsdp_worker.py"), json.dumps(jobs)], 29631)
    out["log"] = done.stdout
    run_here(settings(rolled_back(out["two_adamw"], out["down"], 2), code_dir), resume=True)
    out["bytes"] = root / "bytes"
    return out


def test_a_sharded_step_equals_one_process(runs):
    """AdamW: 2 ranks x 2 windows == 1 process x 4 windows after 4 steps; and fsdp on 1 rank == the plain path."""
    assert gap(runs["one_adamw"], runs["two_adamw"]) < TOL
    assert gap(runs["one_adamw"], runs["one_fsdp"]) == 0.0  # one rank: nothing sharded, the same computation
    torch.manual_seed(1337)  # the trainer's seed: the initial weights
    start = bytelm.build(bytelm.load(runs["one_adamw"]).config).state_dict()
    trained = bytelm.load(runs["two_adamw"]).state_dict()
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 100 * TOL  # it did train
    shards = sorted(p.name for p in (runs["two_adamw"] / "checkpoints" / "step-0000004" / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own


def test_bf16_mixed_precision_keeps_fp32_weights(runs):
    """bf16 MixedPrecisionPolicy: blocks gathered and run in bf16, gradients reduced in fp32, the sharded weights and
    the update in fp32: the weights stay fp32 and near the fp32 run's (bf16 rounding of activations only)."""
    bf16, fp32 = bytelm.load(runs["two_bf16"]), bytelm.load(runs["two_adamw"])
    assert {t.dtype for t in bf16.state_dict().values()} == {torch.float32}
    assert gap(runs["two_adamw"], runs["two_bf16"]) > 0  # it did compute in bf16
    x = torch.tensor([list((Path(json.__file__).parent / "decoder.py").read_bytes()[:512])])
    with torch.no_grad():
        assert abs(bf16.loss(x).item() - fp32.loss(x).item()) < 0.05  # nats per byte: the same model, to bf16


def test_sharded_muon_equals_one_process(runs):
    """Muon under FSDP2: each matrix gathered to its owner rank, orthogonalised there, its rows scattered back."""
    assert "muon: ShardedMuon" in runs["log"]
    assert gap(runs["one_muon"], runs["two_muon"]) < TOL


def test_checkpoints_reshard_between_rank_counts(runs):
    """Step 2 of a 2-rank run resumed on 1 rank, and of a 1-rank run on 2 ranks: both end at the uninterrupted
    run's weights."""
    assert gap(runs["one_adamw"], runs["down"]) < TOL
    assert gap(runs["one_adamw"], runs["up"]) < TOL
    assert "written by 1 process)" in runs["log"]


def test_each_rank_holds_half_the_training_state(runs, code_dir, tmp_path):
    """Parameters, gradients and optimizer state per rank, measured after a step: ~1/2 of one process's (shards
    are whole rows: exactly half for the tiny model's even row counts)."""
    alone = Trainer(TrainConfig.from_dict(settings(tmp_path / "one", code_dir, optimizer="muon")),
                    log=lambda *_: None)
    sys.path.insert(0, str(HERE))
    try:
        from fsdp_worker import state_bytes
    finally:
        sys.path.remove(str(HERE))
    whole = state_bytes(alone)
    for rank in (0, 1):
        mine = json.loads(Path(f"{runs['bytes']}.{rank}").read_text())
        for part in ("params", "grads", "optimizer"):
            assert 0.49 <= mine[part] / whole[part] <= 0.52, (part, rank, mine[part], whole[part])


def test_kill_9_leaves_a_checkpoint_that_resumes_to_the_uninterrupted_run(code_dir, tmp_path):
    """Two ranks killed (SIGKILL, the whole process group) at a random moment after their third checkpoint, one
    every step; the run then resumes under torchrun and ends at the weights of a run never interrupted."""
    cli = ["-m", "bytelm.cli", "train", "--preset", "tiny", "--data", str(code_dir), "--seq-len", "64",
           "--batch-size", "2", "--max-steps", "10", "--warmup-steps", "1", "--save-interval", "1",
           "--eval-interval", "10", "--eval-batches", "1", "--sample-bytes", "0", "--val-fraction", "0.1",
           "--precision", "fp32", "--optimizer", "adamw", "--parallel", "fsdp", "--out-dir", str(tmp_path / "run")]
    proc = torchrun(cli, 29632, background=True)
    latest, deadline = tmp_path / "run" / "checkpoints" / "latest", time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.is_file() and latest.read_text().strip() >= "step-0000003":
                time.sleep(random.Random().uniform(0, 0.5))
                break
            time.sleep(0.05)
    finally:
        kill_tree(proc.pid)  # torchrun and both ranks, at once
        proc.wait()
    step = int(latest.read_text().strip().split("-")[1])
    assert 3 <= step, proc.stdout.read()[-2000:]
    bytelm.load(tmp_path / "run")  # the checkpoint `latest` names loads as a model
    torchrun([*cli, "--resume"], 29633)
    run_here(settings(tmp_path / "alone", code_dir, max_steps=10, save_interval=10, eval_interval=10, parallel="ddp"))
    assert gap(tmp_path / "alone", tmp_path / "run") < TOL


def test_a_run_without_consolidating_is_consolidated_by_command(code_dir, tmp_path, capsys):
    run_here(settings(tmp_path / "run", code_dir, consolidate=False, max_steps=2))
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    assert not (ckpt / "model.safetensors").exists()
    with pytest.raises(CheckpointError, match="bytelm consolidate"):
        bytelm.load(tmp_path / "run")
    assert cli_main(["consolidate", str(tmp_path / "run"), "--out", str(tmp_path / "whole")]) == 0
    assert cli_main(["consolidate", str(tmp_path / "run")]) == 0
    assert gap(tmp_path / "whole", tmp_path / "run") == 0.0
    assert cli_main(["consolidate", str(tmp_path)]) == 2
    assert "neither a sharded checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_four(runs, code_dir, tmp_path):
    """Step 2 of the 2-rank run, resumed on 4 ranks x 1 window: the uninterrupted run's weights (4 processes on this
    2-core machine: slow)."""
    run = rolled_back(runs["two_adamw"], tmp_path / "four", 2)
    job = [{"settings": settings(run, code_dir, batch_size=1), "resume": True}]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", "29634",
           str(HERE / "fsdp_worker.py"), json.dumps(job)]
    done = run_group(cmd, env=ENV)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "written by 2 processes" in done.stdout
    assert gap(runs["one_adamw"], run) < TOL


def test_a_sharded_checkpoint_that_does_not_fit_is_one_clear_error(runs, code_dir, tmp_path):
    run = rolled_back(runs["one_fsdp"], tmp_path / "run", 4)
    with pytest.raises(CheckpointError, match="cannot be loaded .*Missing key .*momentum_buffer"):
        run_here(settings(run, code_dir, optimizer="muon", max_steps=6), resume=True)  # written with AdamW
    with pytest.raises(CheckpointError, match="differs from this run's: patch_size=4 \\(this run: 8\\)"):
        run_here(settings(run, code_dir, max_steps=6, model={"patch_size": 8}), resume=True)
    (run / "checkpoints" / "step-0000004" / "sharded" / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="cannot be loaded .*No such file"):
        run_here(settings(run, code_dir, max_steps=6), resume=True)


def test_a_lora_fine_tune_refuses_fsdp():
    from bytelm.finetune import FinetuneConfig

    with pytest.raises(bytelm.ConfigError, match="LoRA fine-tune runs under --parallel ddp"):
        FinetuneConfig.flat(base="some/model", parallel="fsdp")
