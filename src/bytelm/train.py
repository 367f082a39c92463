"""Training: AdamW with warmup + cosine decay, clipping, accumulation, bf16 autocast on CUDA, optional torch.compile and
activation checkpointing, data parallel under torchrun, and atomic checkpoints that resume exactly.

A run folder (`out_dir`) describes itself:

    run.json                      resolved settings (TrainConfig + model config + data split)
    metrics.csv, loss.png         one row per log/eval interval; the loss curve
    checkpoints/latest            name of the newest complete checkpoint (rewritten atomically, last)
    checkpoints/step-0000200/     config.json + model.safetensors + README.md (a loadable model folder, a Hub
                                  model repository; a LoRA fine-tune's holds its adapter: see bytelm.lora),
                                  optimizer.safetensors (AdamW moments, RNG state), trainer_state.json

A checkpoint is written into a temporary folder and renamed into place before `latest` is updated, so a kill at any
moment leaves the previous checkpoint whole and pointed to. `bytelm.load(out_dir)` loads the latest model.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from . import __version__, build
from .checkpoint import CheckpointError, atomic_write_text, latest_checkpoint, load_model, save_model
from .config import CONFIG_CLASSES, ConfigError
from .data import WindowSampler, load_split
from .layers import Block
from .model import ByteLM, byte_loss

LN2 = math.log(2)
log_line = functools.partial(print, flush=True)  # flushed: progress shows up promptly in a piped log too


@dataclass
class TrainConfig:
    """Everything a run needs; `bytelm train` exposes each field as a flag (--max-steps, --batch-size, ...)."""

    model_type: str = "megabyte"  # megabyte | transformer
    preset: str = "small"  # a named preset of that model type
    model: dict[str, Any] = field(default_factory=dict)  # overrides of model config fields
    data: list[str] = field(default_factory=list)  # files/folders; empty: the Python standard library's source
    val_fraction: float = 0.05
    separator: int | None = None  # byte joining documents; None: plain concatenation
    out_dir: str = ""  # run folder; empty: runs/<model_type>-<preset>
    seq_len: int = 0  # 0: the model's max_seq_len
    batch_size: int = 8  # per process and micro-step; global batch = batch_size * grad_accum * processes
    grad_accum: int = 1
    max_steps: int = 600  # also the length of the cosine schedule
    time_budget: float = 0.0  # seconds of training before stopping early; 0: none
    lr: float = 2e-3  # peak learning rate (small models take a high one)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    activation_checkpointing: bool = False
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    save_interval: int = 100
    keep_checkpoints: int = 2
    sample_bytes: int = 256  # printed after training; 0: no sample
    sample_prompt: str = "def "

    _kind: ClassVar[str] = "train"  # names the config in its errors

    def __post_init__(self) -> None:
        for ok, msg in self._checks():
            if not ok:
                raise ConfigError(f"{self._kind} config: {msg}")
        if not self.out_dir:
            self.out_dir = self._default_out_dir()

    def _checks(self) -> list[tuple[bool, str]]:
        return [(self.model_type in CONFIG_CLASSES, f"model_type must be one of {list(CONFIG_CLASSES)}"),
                *self._schedule_checks()]

    def _default_out_dir(self) -> str:
        return f"runs/{self.model_type}-{self.preset}"

    def _schedule_checks(self) -> list[tuple[bool, str]]:
        """The checks every run shares, a fine-tune too (bytelm.lora.FinetuneConfig)."""
        return [
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.seq_len >= 0, "seq_len must be >= 0"),
            (self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr must be > 0 and min_lr_ratio in [0, 1]"),
            (self.precision in ("auto", "fp32", "bf16"), "precision must be auto, fp32 or bf16"),
            (min(self.log_interval, self.eval_interval, self.save_interval, self.eval_batches) >= 1,
             "log_interval, eval_interval, save_interval and eval_batches must be >= 1"),
        ]

    def model_config(self):
        return CONFIG_CLASSES[self.model_type].from_name(self.preset, **self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown train setting(s): {', '.join(unknown)}")
        return cls(**d)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Decay matrices and embeddings, not norms, biases or the learned pad vectors (as in nanoGPT)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them (long sequences)."""
    for m in model.modules():
        if isinstance(m, Block):
            m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device")
    return dev


# --- checkpoints ---------------------------------------------------------------------------------------------------
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON metadata: no pickle."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


# --- the trainer ---------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, log=log_line) -> None:
        self.cfg, self.log_fn = cfg, log
        self.out = Path(cfg.out_dir)
        self.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.ddp:
            self.device = resolve_device(cfg.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
        else:
            self.device, self.rank, self.world = resolve_device(cfg.device), 0, 1
        self.master = self.rank == 0

        self.model_config = cfg.model_config()
        self.seq_len = cfg.seq_len or self.model_config.max_seq_len
        if self.seq_len > self.model_config.max_seq_len:
            raise ConfigError(f"seq_len {self.seq_len} exceeds the model's max_seq_len "
                              f"{self.model_config.max_seq_len}; raise it with --model max_seq_len=N")
        self.train_data, self.val_data, self.split_info = load_split(cfg.data or None, cfg.val_fraction, cfg.separator)
        self.sampler = WindowSampler(self.train_data, self.seq_len, cfg.batch_size, cfg.seed, self.rank, self.world)
        WindowSampler(self.val_data, self.seq_len, 1, 0)  # fail now, with a clear message, if val is too short

        torch.manual_seed(cfg.seed)
        self.model: ByteLM = self.build_model().to(self.device)
        self.optimizer = make_optimizer(self.model, cfg)  # the parameters that require grad: all, or a LoRA's
        self.step, self.elapsed, self.bytes_seen = 0, 0.0, 0
        self.last_val: tuple[int, float] | None = None  # (step, loss) of the latest validation estimate
        if resume:
            self._load_checkpoint()
        elif latest_checkpoint(self.out) is not None:
            raise CheckpointError(f"{self.out} already holds a run; pass --resume to continue it, or choose "
                                  "another --out-dir")

        if cfg.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.forward = self.model
        if self.ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.forward = torch.compile(self.forward)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16
                         else contextlib.nullcontext())

    # what a fine-tune changes (bytelm.lora.FinetuneTrainer) ----------------------------------------------------
    def build_model(self) -> ByteLM:
        """The model to train, on the CPU: a fresh one of the run's config."""
        return build(self.model_config)

    def describe(self) -> str:
        return f"{self.model_config.model_type} {self.cfg.preset}: {self.model.num_params():,} params"

    def save_weights(self, folder: Path) -> None:
        """Write what the run trains into a checkpoint folder: here a whole model folder."""
        save_model(self.model, folder, **self.card_info())

    def load_weights(self, ckpt: Path) -> None:
        saved = load_model(ckpt)
        if saved.config != self.model_config:
            raise CheckpointError(f"--resume: the checkpoint's model config differs from this run's: "
                                  f"{saved.config} vs {self.model_config}")
        self.model.load_state_dict(saved.state_dict())

    def before_training(self) -> None:
        """Called once per run() before its first step (a fine-tune scores its base here)."""

    def card_info(self) -> dict[str, Any]:
        """What a checkpoint's model card says about the run: its name, data and latest validation estimate."""
        info: dict[str, Any] = {"name": self.out.name, "data": self.split_info}
        if self.last_val is not None:
            info.update(step=self.last_val[0], val_bpb=self.last_val[1] / LN2)
        return info

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # logging ---------------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.master:
            self.log_fn(msg)

    def _metrics(self, row: dict[str, Any]) -> None:
        if not self.master:
            return
        path = self.out / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "split", "loss", "bpb", "lr", "bytes_per_s", "elapsed_s"])
            if new:
                w.writeheader()
            w.writerow(row)

    def log_val(self, val: float, note: str = "") -> None:
        """A validation loss to the log and to metrics.csv, at the current step."""
        self.log(f"step {self.step:>6} | val loss {val:.4f} | val bpb {val / LN2:.3f}{note}")
        self._metrics(dict(step=self.step, split="val", loss=f"{val:.5f}", bpb=f"{val / LN2:.5f}",
                           lr="", bytes_per_s="", elapsed_s=f"{self.elapsed:.1f}"))

    def _all_agree(self, flag: bool) -> bool:
        """Rank 0's decision for every process (clocks differ: ranks must stop at the same step)."""
        if not self.ddp:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    # evaluation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def estimate_val(self) -> float:
        """Mean loss (nats/byte) over eval_batches fixed random validation windows: the same windows every time."""
        self.model.eval()
        sampler = WindowSampler(self.val_data, self.seq_len, self.cfg.batch_size, seed=0)
        losses = []
        for _ in range(self.cfg.eval_batches):
            x = sampler.next_batch().to(self.device)
            with self.autocast:
                losses.append(self.model.loss(x).item())
        self.model.train()
        return sum(losses) / len(losses)

    # checkpoints -----------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        if not self.master:
            return None
        root = self.out / "checkpoints"
        name = f"step-{self.step:07d}"
        final, tmp = root / name, root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.save_weights(tmp)
        tensors, meta = _optimizer_tensors(self.optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, tmp / "optimizer.safetensors")
        state = {"step": self.step, "elapsed": self.elapsed, "bytes_seen": self.bytes_seen,
                 "sampler": self.sampler.state_dict(), "optimizer": meta, "last_val": self.last_val,
                 "bytelm_version": __version__}
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", name + "\n")  # the commit point
        kept = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in kept[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_checkpoint(self) -> None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            raise CheckpointError(f"--resume: {self.out} has no checkpoint to resume from")
        self.load_weights(ckpt)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        tensors = load_file(ckpt / "optimizer.safetensors")
        self.optimizer.load_state_dict(_optimizer_state(tensors, state["optimizer"]))
        torch.set_rng_state(tensors["rng.torch"])
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.elapsed, self.bytes_seen = state["step"], state["elapsed"], state["bytes_seen"]
        self.last_val = tuple(state["last_val"]) if state.get("last_val") else None
        self._truncate_metrics()
        self.log(f"resumed {self.out} at step {self.step} ({ckpt.name})")

    def _truncate_metrics(self) -> None:
        """Drop metric rows logged after the checkpoint we resume from: they will be logged again."""
        path = self.out / "metrics.csv"
        if not self.master or not path.exists():
            return
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.step]
        path.unlink()
        for r in rows:
            self._metrics(r)

    # the loop --------------------------------------------------------------------------------------------------
    def write_run_info(self) -> None:
        if not self.master:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        info = {
            "bytelm_version": __version__, "torch_version": torch.__version__, "train": self.cfg.to_dict(),
            "model": self.model_config.to_dict(), "params": self.model.num_params(),
            "trainable_params": self.trainable_params, "seq_len": self.seq_len,
            "processes": self.world, "global_batch_bytes": self.batch_bytes, "device": str(self.device),
            "data": self.split_info,
        }
        atomic_write_text(self.out / "run.json", json.dumps(info, indent=2) + "\n")

    @property
    def batch_bytes(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.world * self.seq_len

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss (nats/byte) on this process."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        total = 0.0
        for micro in range(cfg.grad_accum):
            x = self.sampler.next_batch().to(self.device, non_blocking=True)
            sync = not self.ddp or micro == cfg.grad_accum - 1  # all-reduce gradients once, on the last micro-step
            with (contextlib.nullcontext() if sync else self.forward.no_sync()), self.autocast:
                loss = byte_loss(self.forward(x), x) / cfg.grad_accum
            loss.backward()
            total += loss.item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.bytes_seen += self.batch_bytes
        return total

    def run(self, until_step: int | None = None) -> dict[str, Any]:
        """Train to max_steps (or `until_step`, or the time budget); returns the final metrics."""
        cfg = self.cfg
        self.write_run_info()
        self.log(f"bytelm {__version__} | {self.describe()} | seq_len {self.seq_len} | global batch "
                 f"{cfg.batch_size}x{cfg.grad_accum}x{self.world} windows ({self.batch_bytes:,} bytes) | "
                 f"device {self.device} | {self.split_info}")
        self.before_training()
        stop = min(cfg.max_steps, until_step or cfg.max_steps)
        bar = tqdm(total=stop, initial=self.step, disable=not (self.master and sys.stderr.isatty()),
                   unit="step", dynamic_ncols=True, leave=False)
        self.model.train()
        t_last, bytes_last, losses = time.perf_counter(), self.bytes_seen, []
        t_start, elapsed0 = time.perf_counter(), self.elapsed
        val = None
        while self.step < stop:
            losses.append(self.train_step())
            self.elapsed = elapsed0 + time.perf_counter() - t_start
            bar.update(1)
            out_of_time = cfg.time_budget > 0 and self._all_agree(self.elapsed >= cfg.time_budget)
            last = self.step == stop or out_of_time
            if self.step % cfg.log_interval == 0 or last:
                now = time.perf_counter()
                loss = sum(losses) / len(losses)
                bps = (self.bytes_seen - bytes_last) / max(now - t_last, 1e-9)
                lr = self.optimizer.param_groups[0]["lr"]
                msg = (f"step {self.step:>6}/{cfg.max_steps} | loss {loss:.4f} | bpb {loss / LN2:.3f} | "
                       f"lr {lr:.2e} | {bps:,.0f} bytes/s | {self.elapsed:,.0f}s")
                if self.master:
                    (self.log_fn if bar.disable else bar.write)(msg)
                self._metrics(dict(step=self.step, split="train", loss=f"{loss:.5f}", bpb=f"{loss / LN2:.5f}",
                                   lr=f"{lr:.3e}", bytes_per_s=f"{bps:.0f}", elapsed_s=f"{self.elapsed:.1f}"))
                t_last, bytes_last, losses = time.perf_counter(), self.bytes_seen, []
            if self.step % cfg.eval_interval == 0 or last:
                val = self.estimate_val()
                self.last_val = (self.step, val)
                self.log_val(val)
            if self.step % cfg.save_interval == 0 or last:
                self.save_checkpoint()
            if self.step % cfg.eval_interval == 0 or self.step % cfg.save_interval == 0:
                t_last = time.perf_counter()  # keep evaluation and saving out of the next bytes/s figure
            if out_of_time:
                self.log(f"time budget of {cfg.time_budget:.0f}s reached at step {self.step}")
                break
        bar.close()
        if self.master:
            plot_metrics(self.out)
        return {"step": self.step, "val_loss": val, "val_bpb": None if val is None else val / LN2,
                "elapsed": self.elapsed, "bytes_seen": self.bytes_seen}


def plot_metrics(out_dir: Path) -> Path | None:
    """loss.png: train and validation bits per byte against step (skipped when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = out_dir / "metrics.csv"
    if not path.exists():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        pts = [(int(r["step"]), float(r["bpb"])) for r in rows if r["split"] == split]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=split, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(out_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    return out_dir / "loss.png"


def sample_text(model: ByteLM, prompt: str, n: int, seed: int) -> str:
    data = prompt.encode() + model.generate(prompt.encode(), n, temperature=0.8, top_k=64, seed=seed)
    return data.decode("utf-8", errors="replace")


def train(cfg: TrainConfig, resume: bool = False, log=log_line, trainer_class: type[Trainer] = Trainer
          ) -> dict[str, Any]:
    """Run (or resume) a training run end to end; print a sample when it is done. A LoRA fine-tune is the same run
    with another `trainer_class` (bytelm.lora.finetune)."""
    trainer = trainer_class(cfg, resume=resume, log=log)
    try:
        result = trainer.run()
        if trainer.master and cfg.sample_bytes > 0:
            n = min(cfg.sample_bytes, trainer.model_config.max_seq_len - len(cfg.sample_prompt.encode()))
            log("--- sample ---\n" + sample_text(trainer.model, cfg.sample_prompt, n, cfg.seed) + "\n--------------")
        return result
    finally:
        if trainer.ddp and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["TrainConfig", "Trainer", "latest_checkpoint", "lr_at", "train"]
