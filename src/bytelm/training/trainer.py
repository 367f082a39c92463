"""Training: Muon + AdamW (or AdamW alone) with warmup + cosine decay, clipping, accumulation, bf16 autocast on CUDA
(and CPUs with native bf16), optional torch.compile and activation checkpointing, data parallel under torchrun
(bytelm.training.parallel), and checkpoints that resume exactly (bytelm.training.checkpointing).

A run folder (`out_dir`) describes itself:

    run.json                      resolved settings (the run config, in sections; model config; data split)
    metrics.csv, loss.png         one row per log/eval interval; the loss curve
    checkpoints/latest            name of the newest complete checkpoint (rewritten atomically, last)
    checkpoints/step-0000200/     config.json + model.safetensors + README.md (a loadable model folder, a Hub
                                  model repository; a LoRA fine-tune's holds its adapter: see bytelm.finetune),
                                  optimizer.safetensors (Muon/AdamW moments, RNG state), trainer_state.json

`bytelm.load(out_dir)` loads the latest model.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from .._version import __version__
from ..data import ImageFormat, Media, WindowSampler, files, load_split, resolve_media
from ..data.media import AudioFormat
from ..devices import check_memory, resolve_device
from ..errors import CheckpointError, ConfigError, TrainingDiverged, UsageError
from ..io import (
    atomic_write_bytes,
    atomic_write_text,
    checkpoint_steps,
    latest_checkpoint,
    write_model_config,
    write_model_files,
)
from ..models import ByteLM, build, get_spec, load_model, read_config, save_model, write_card
from ..models.loss import LOSS_CHUNK_BYTES
from ..nn import Block
from . import metrics
from .checkpointing import OPTIMIZER_NAME, check_trainer_state, read_checkpoint, set_aside_later, write_checkpoint
from .config import RunConfig
from .memory import map_large_allocations, training_parts
from .optim import make_optimizer, optimizer_state, optimizer_tensors, state_shape_problems
from .parallel import ParallelEnv, full, local, no_sync, shard_model, wrap_model
from .precision import autocast_for, uses_bf16
from .schedule import lr_at
from .sharded import full_model_state, load_sharded, save_sharded

LN2 = math.log(2)
log_line = functools.partial(print, flush=True)  # flushed: progress shows up promptly in a piped log too


def enable_activation_checkpointing(model: torch.nn.Module, chunk_bytes: int | None = LOSS_CHUNK_BYTES) -> None:
    """Recompute activations in the backward pass instead of storing them (long sequences): each transformer block's,
    and with `chunk_bytes` the loss chunk by chunk of that many bytes (`ByteLM.loss_chunk_bytes`: never the whole
    logits; MEGABYTE's local model inside each chunk, so its blocks are not checkpointed a second time). `model`: a
    ByteLM, or a wrapper holding one (a LoRA fine-tune's peft model)."""
    lm = next(m for m in model.modules() if isinstance(m, ByteLM))
    inside = {id(b) for name in lm.chunked_stacks for b in lm.get_submodule(name).modules()} if chunk_bytes else set()
    for m in model.modules():
        if isinstance(m, Block) and id(m) not in inside:
            m.forward = functools.partial(checkpoint, m.forward, use_reentrant=False)
    lm.loss_chunk_bytes = chunk_bytes


def with_media(config, media: Media, fixed_len: bool):
    """The model config for data of `media`: its modality recorded (so the model knows what it generates), and an
    image model's max_seq_len one image (unless the run set it)."""
    spec = "bytes" if media is None else media.spec
    if config.modality == spec:
        return config
    changes: dict[str, Any] = {"modality": spec}
    if isinstance(media, ImageFormat) and not fixed_len:
        changes["max_seq_len"] = media.seq_len
    return config.replace(**changes)


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False, log=log_line) -> None:
        self.cfg, self.log_fn = cfg, log
        self.out = Path(cfg.out_dir)
        self.env = ParallelEnv.from_environment(resolve_device(cfg.parallel.device))
        self.device, self.rank, self.world, self.master = self.env.device, self.env.rank, self.env.world, \
            self.env.master

        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out-dir {self.out} is a file, not a folder")
        # what the data is (images, audio, bytes), from file names and one header: the model and the sequence
        # length follow from it, and the memory check comes before any image or clip is decoded
        self.media, convert = self.data_media()
        self.model_config = with_media(cfg.model_config(), self.media, "max_seq_len" in cfg.model_overrides)
        self.seq_len = self.sequence_length()
        self.check_memory()  # before the data is read and the model built: refuse what the device cannot hold
        data = cfg.data
        self.train_data, self.val_data, self.split_info = load_split(data.paths or None, data.val_fraction,
                                                                     data.separator, self.media, data.image_fit,
                                                                     convert)
        self.sampler = WindowSampler(self.train_data, self.seq_len, data.batch_size, cfg.seed, self.rank, self.world)
        WindowSampler(self.val_data, self.seq_len, 1, 0)  # fail now, with a clear message, if val is too short

        torch.manual_seed(cfg.seed)
        self.model: ByteLM = self.build_model().to(self.device)
        stacks = get_spec(self.model_config.model_type).stacks
        # the order torchtitan applies them in: activation checkpointing, then compiling, then sharding or DDP
        par = cfg.parallel
        if par.activation_checkpointing:
            enable_activation_checkpointing(self.model)
            if self.device.type == "cpu":  # chunk after chunk of the same tensors: keep glibc from hoarding them
                map_large_allocations()
        self.fsdp = par.strategy == "fsdp"
        self.autocast = autocast_for(par.precision, self.device)
        if self.fsdp:  # sharded in place; each block compiled (no eager fallback: a failure is an error)
            bf16 = uses_bf16(par.precision, self.device)
            shard_model(self.model, self.env, stacks.get("local", ()), par.fsdp_local, bf16, par.compile)
            if bf16 and self.env.distributed:  # FSDP's policy computes in bf16 and reduces in fp32: no autocast
                self.autocast = contextlib.nullcontext()
            self.eager_forward = self.forward = self.model
        else:
            self.eager_forward = self.forward = wrap_model(self.model, self.env)
        # compiled on its first call (the first micro-step); a failure there falls back to eager (`_micro_step`)
        self.compile_pending = par.compile and not self.fsdp
        if self.compile_pending:
            self.forward = torch.compile(self.forward)
        # the parameters that require grad: all, or a LoRA's; per-stack learning rates from the model type's spec
        self.optimizer = make_optimizer(self.model, cfg.optimizer, stacks)
        self.step, self.elapsed, self.bytes_seen, self.lr = 0, 0.0, 0, 0.0
        self.bad_steps = 0  # non-finite steps in a row (skipped)
        self.save_due = False  # a checkpoint put off by a non-finite step
        self.last_batch: torch.Tensor | None = None  # what a checkpoint's weights are checked on
        self.last_val: tuple[int, float] | None = None  # (step, loss) of the latest validation estimate
        if resume:
            self._load_checkpoint()
        elif latest_checkpoint(self.out) is not None:
            raise CheckpointError(f"{self.out} already holds a run; pass --resume to continue it, or choose "
                                  "another --out-dir")
        elif stray := checkpoint_steps(self.out / "checkpoints"):  # not ours to prune, nor to mix with a new run's
            found = ", ".join(p.name for p in stray.values())
            raise CheckpointError(f"{self.out}/checkpoints holds {found} but no `latest`: write the name of the one "
                                  "to continue from into checkpoints/latest and pass --resume, or choose another "
                                  "--out-dir")


    def sequence_length(self) -> int:
        """Bytes per training sequence: one whole image; else --seq-len, or the model's max_seq_len."""
        cfg, media, max_len = self.cfg, self.media, self.model_config.max_seq_len
        if isinstance(media, ImageFormat):
            if cfg.data.seq_len not in (0, media.seq_len):
                raise ConfigError(f"an image model trains on whole images: seq_len must be {media.seq_len:,} "
                                  f"({media.height}x{media.width}x{media.channels}) or 0, got {cfg.data.seq_len:,}")
            return media.seq_len
        seq_len = cfg.data.seq_len or max_len
        if seq_len > max_len:
            raise ConfigError(f"seq_len {seq_len} exceeds the model's max_seq_len {max_len}; raise it with --model "
                              "max_seq_len=N")
        if isinstance(media, AudioFormat) and seq_len % media.bytes_per_sample:
            raise ConfigError(f"seq_len {seq_len:,} is not a whole number of {media.sample_format} samples "
                              f"({media.bytes_per_sample} bytes each)")
        return seq_len

    @property
    def ddp(self) -> bool:
        return self.env.distributed

    # what a fine-tune changes (bytelm.finetune.FinetuneTrainer) ------------------------------------------------
    def data_media(self) -> tuple[Media, bool]:
        """What the data is (bytelm.data.media; None: bytes) and whether its shape was stated (then images are
        converted to its channels and clips resampled to its rate)."""
        d = self.cfg.data
        return resolve_media(d.paths or None, d.modality, d.image_size, d.sample_rate, d.sample_format)

    def memory_parts(self) -> list[tuple[str, int]]:
        """(label, bytes) of what a training step holds at its peak (bytelm.training.memory)."""
        cfg = self.cfg
        sharded_over = self.env.world if cfg.parallel.strategy == "fsdp" else 1
        return training_parts(self.model_config, cfg.data.batch_size, self.seq_len, cfg.optimizer.name,
                              cfg.parallel.precision, self.device, cfg.parallel.activation_checkpointing,
                              self.env.distributed and sharded_over == 1, sharded_over=sharded_over)

    def check_memory(self) -> None:
        """Refuse (`MemoryLimitError`, with the estimate) a run whose model, optimizer and batch cannot fit."""
        parts = self.memory_parts()
        check_memory(sum(n for _, n in parts), self.device, "this run", parts,
                     "lower --batch-size (and raise --grad-accum to keep the batch) or the model's size")

    def build_model(self) -> ByteLM:
        """The model to train, on the CPU: a fresh one of the run's config."""
        return build(self.model_config)

    def describe(self) -> str:
        return f"{self.model_config.model_type} {self.cfg.model.preset}: {self.model.num_params():,} params"

    def save_weights(self, folder: Path) -> None:
        """Write what the run trains into a checkpoint folder: here a whole model folder."""
        save_model(self.model, folder, **self.card_info())

    def load_weights(self, ckpt: Path) -> None:
        saved = load_model(ckpt)
        self.check_model_config(saved.config)
        self.model.load_state_dict(saved.state_dict())

    def check_model_config(self, saved) -> None:
        """A checkpoint's model config must be this run's: the fields that differ, named, if not."""
        if saved != self.model_config:
            ours = self.model_config.to_dict()
            diff = [f"{k}={v!r} (this run: {ours.get(k)!r})" for k, v in saved.to_dict().items() if ours.get(k) != v]
            raise CheckpointError(f"--resume: the checkpoint's model config differs from this run's: "
                                  f"{', '.join(diff) or f'{saved} vs {self.model_config}'}")

    def before_training(self) -> None:
        """Called once per run() before its first step (a fine-tune scores its base here)."""

    def card_info(self) -> dict[str, Any]:
        """What a checkpoint's model card says about the run: its name, data and latest validation estimate."""
        info: dict[str, Any] = {"name": self.out.name, "data": self.split_info}
        if self.last_val is not None:
            info.update(step=self.last_val[0], val_bpb=self.last_val[1] / LN2)
        return info

    def close(self) -> None:
        """Release the process group, after dropping what holds it. The DDP wrapper's reducer must not be the last
        holder of the gloo group: its destructor joins gloo's threads while holding the GIL, and a thread that needs
        the GIL deadlocks it (seen at the end of 2-process runs, one in three; py-spy: ~ProcessGroupGloo joining a
        thread blocked in decref). A sharded model and its optimizer state hold the group too (through their device
        mesh): dropped as well, so the trainer is done with after this."""
        self.forward = self.eager_forward = self.model = self.optimizer = None
        gc.collect()
        self.env.close()

    def whole_model(self) -> ByteLM | None:
        """The trained model, whole, on rank 0 (None on the others): a sharded one gathered into an unsharded copy
        on the CPU (collective)."""
        if not (self.fsdp and self.env.distributed):
            return self.model if self.master else None
        state = full_model_state(self.model)
        if not self.master:
            return None
        whole = build(self.model_config)
        whole.load_state_dict(state)
        return whole.eval()

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # logging ---------------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.master:
            self.log_fn(msg)

    def _metrics(self, row: dict[str, Any]) -> None:
        if self.master:
            metrics.append_row(self.out / "metrics.csv", row)

    def log_val(self, val: float, note: str = "") -> None:
        """A validation loss to the log and to metrics.csv, at the current step."""
        self.log(f"step {self.step:>6} | val loss {val:.4f} | val bpb {val / LN2:.3f}{note}")
        self._metrics(dict(step=self.step, split="val", loss=f"{val:.5f}", bpb=f"{val / LN2:.5f}",
                           lr="", bytes_per_s="", elapsed_s=f"{self.elapsed:.1f}"))

    # evaluation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def estimate_val(self) -> float:
        """Mean loss (nats/byte) over eval_batches fixed random validation windows: the same windows every time."""
        self.model.eval()
        sampler = WindowSampler(self.val_data, self.seq_len, self.cfg.data.batch_size, seed=0)
        losses = []
        for _ in range(self.cfg.eval_batches):
            x = sampler.next_batch().to(self.device)
            with self.autocast:
                losses.append(self.model.loss(x).item())
        self.model.train()
        return sum(losses) / len(losses)

    # checkpoints -----------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        if not self.env.agree(self.model_finite()):  # never let `latest` move to a broken model
            raise TrainingDiverged(f"training diverged at step {self.step}: the updated weights are not finite or "
                                   f"give a non-finite loss; not saved. {self.kept_checkpoint()} Try a lower --lr "
                                   f"(it is {self.cfg.optimizer.lr:g}).")
        state = {"step": self.step, "elapsed": self.elapsed, "bytes_seen": self.bytes_seen,
                 "sampler": self.sampler.state_dict(), "last_val": self.last_val, "processes": self.world,
                 "global_batch": self.global_batch,
                 "bytelm_version": __version__}
        if self.fsdp:  # every rank writes its shards; rank 0 the whole model beside them
            full = full_model_state(self.model) if self.cfg.checkpointing.consolidate else None  # (collective)

            def write_files(folder: Path) -> None:
                save_sharded(folder, self.model, self.optimizer)
                if self.master:
                    self.save_whole(folder, full)

            return write_checkpoint(self.out / "checkpoints", self.step, write_files,
                                    {**state, "optimizer": {"format": "sharded"}},
                                    self.cfg.checkpointing.keep_checkpoints, self.env)
        if not self.master:
            return None
        tensors, meta = optimizer_tensors(self.optimizer)
        tensors["rng.torch"] = torch.get_rng_state()

        def write_files(folder: Path) -> None:
            self.save_weights(folder)
            save_file(tensors, folder / OPTIMIZER_NAME)

        return write_checkpoint(self.out / "checkpoints", self.step, write_files, {**state, "optimizer": meta},
                                self.cfg.checkpointing.keep_checkpoints)

    def save_whole(self, folder: Path, state: dict[str, torch.Tensor] | None) -> None:
        """A sharded checkpoint's model folder: its config.json, and with `state` (the whole weights, gathered to
        rank 0) model.safetensors and its card; without, `bytelm consolidate` writes them later from the shards."""
        if state is None:
            write_model_config(folder, self.model_config.to_dict())
            return
        write_card(folder, self.model_config, self.model.num_params(), **self.card_info())
        write_model_files(folder, state, self.model_config.to_dict())

    def _load_checkpoint(self) -> None:
        found = read_checkpoint(self.out)
        if found is None:
            raise CheckpointError(f"--resume: {self.out} has no checkpoint to resume from")
        ckpt, tensors, state = found
        check_trainer_state(ckpt, state)
        if tensors is None:  # a sharded checkpoint, resharded onto this run's ranks
            self._load_sharded(ckpt, state)
        else:
            self._load_whole(ckpt, tensors, state)
        self.step, self.elapsed, self.bytes_seen = state["step"], float(state["elapsed"]), state["bytes_seen"]
        self.last_val = tuple(state["last_val"]) if state.get("last_val") else None
        if self.master:
            metrics.truncate(self.out / "metrics.csv", self.step)
            aside = set_aside_later(self.out / "checkpoints", self.step)
            if aside is not None:
                self.log(f"checkpoints after step {self.step} (`latest` was rolled back past them) moved to {aside}")
        processes = state.get("processes", self.world)
        moved = f", written by {processes} process{'es' if processes > 1 else ''}" if processes != self.world else ""
        self.log(f"resumed {self.out} at step {self.step} ({ckpt.name}{moved})")
        windows = self.global_batch
        if state.get("global_batch", windows) != windows:  # the sampler draws the global batch: it must stay
            self.log(f"warning: the global batch was {state['global_batch']} windows and is now {windows} "
                     f"(batch_size x grad_accum x processes): the run goes on, but not as it would have; keep "
                     f"--batch-size x --grad-accum x processes at {state['global_batch']} to resume exactly")

    def _load_sharded(self, ckpt: Path, state: dict[str, Any]) -> None:
        self.check_model_config(read_config(ckpt))
        load_sharded(ckpt, self.model, self.optimizer)
        self._load_sampler(ckpt, state)

    def _load_sampler(self, ckpt: Path, state: dict[str, Any]) -> None:
        try:
            self.sampler.load_state_dict(state["sampler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"--resume: {ckpt}'s random number generator state is corrupt ({e!s})") from None

    def _load_whole(self, ckpt: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        if self.fsdp and self.env.distributed:
            raise CheckpointError(f"--resume: {ckpt} was written by a --parallel ddp or one-process run, whose "
                                  "optimizer state is not sharded: resume it with --parallel ddp (its next "
                                  "checkpoints can then be resumed under fsdp only if written by an fsdp run)")
        self.load_weights(ckpt)
        try:
            sd = optimizer_state(tensors, state["optimizer"])
            wrong = state_shape_problems(self.optimizer, sd)
            if wrong:
                raise ValueError(f"moments of other shapes than the model's: {'; '.join(wrong[:4])}")
            self.optimizer.load_state_dict(sd)
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # torch: "loaded state dict has a different
            # number of parameter groups", ...; a Muon + AdamW state read by AdamW alone: KeyError
            raise CheckpointError(f"--resume: {ckpt}'s optimizer state does not fit this run's optimizer ({e!s}); "
                                  "was it written with other settings (e.g. --optimizer, local_lr_scale)?"
                                  ) from None
        try:
            torch.set_rng_state(tensors["rng.torch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"--resume: {ckpt}'s random number generator state is corrupt ({e!s})") from None
        self._load_sampler(ckpt, state)

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
        return self.global_batch * self.seq_len

    @property
    def global_batch(self) -> int:
        """Windows an optimizer step takes over all processes (what the sampler draws: bytelm.data.WindowSampler)."""
        return self.cfg.data.batch_size * self.cfg.data.grad_accum * self.world

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss (nats/byte) on this process."""
        cfg, clip = self.cfg, self.cfg.optimizer.grad_clip
        elapsed = self.env.shared(self.elapsed) if cfg.schedule.time_budget > 0 else self.elapsed  # one lr, all ranks
        lr = self.lr = lr_at(self.step, cfg, elapsed)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        total = 0.0
        for micro in range(cfg.data.grad_accum):
            x = self.last_batch = self.sampler.next_batch().to(self.device, non_blocking=True)
            sync = micro == cfg.data.grad_accum - 1  # all-reduce gradients once, on the last micro-step
            total += self._micro_step(x, sync)
        params = [p for p in self.model.parameters() if p.grad is not None]
        # the gradient norm, clipped to grad_clip (0: only measured, for the check below)
        norm = full(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
        # the norm is of the all-reduced gradients, the same on every rank; rank 0 decides for all
        if self.env.agree(not (math.isfinite(total) and math.isfinite(norm))):
            self._skip_bad_step(total, float(norm))
        else:
            self.optimizer.step()
            self.bad_steps = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.bytes_seen += self.batch_bytes
        return total

    def _skip_bad_step(self, loss: float, norm: float) -> None:
        """A step whose loss or gradient norm is not finite makes no update. A rare bad batch (an overflow, a spike)
        is skipped and training goes on, as large runs do (PaLM skipped batches around its spikes); `max_bad_steps`
        in a row, or weights that are themselves broken, stop the run: skipping more would only burn time."""
        self.bad_steps += 1
        what = f"step {self.step + 1}: loss {loss:.4g}, gradient norm {norm:.4g}"
        broken = not self.weights_finite()
        if broken or self.bad_steps > self.cfg.optimizer.max_bad_steps:
            why = "the weights are no longer finite" if broken else f"{self.bad_steps} steps in a row were not finite"
            raise TrainingDiverged(f"training diverged at {what}: {why}; stopped without saving. "
                                   f"{self.kept_checkpoint()} Try a lower --lr (it is {self.cfg.optimizer.lr:g}).")
        self.log(f"warning: {what}: not finite, update skipped ({self.bad_steps} of at most "
                 f"{self.cfg.optimizer.max_bad_steps} in a row)")

    def weights_finite(self) -> bool:
        """Whether every trained weight is finite (on every rank: a sharded model's ranks each check their shards;
        collective under fsdp)."""
        ok = all(bool(torch.isfinite(local(p)).all()) for p in self.model.parameters() if p.requires_grad)
        return self.env.all_true(ok) if self.fsdp else ok

    @torch.no_grad()
    def model_finite(self) -> bool:
        """Finite weights that give a finite loss on the last batch: an update can leave finite weights so large
        that every forward overflows (one micro-batch's forward, at each checkpoint only)."""
        if not self.weights_finite():
            return False
        if self.last_batch is None:
            return True
        self.model.eval()
        with self.autocast:
            loss = self.model.loss(self.last_batch)
        self.model.train()
        return bool(torch.isfinite(loss))

    def kept_checkpoint(self) -> str:
        ckpt = latest_checkpoint(self.out)
        return f"{self.out}/checkpoints/latest still names {ckpt.name}: resume from it with --resume." if ckpt \
            else "No checkpoint was written."

    def _micro_step(self, x: torch.Tensor, sync: bool) -> float:
        """Forward and backward of one micro-batch; returns its loss / grad_accum. With `compile`, the first call
        compiles (forward and backward); if that fails, one warning line and the run goes on uncompiled."""
        try:
            with no_sync(self.forward, sync), self.autocast:
                # the model's own loss: chunked with activation checkpointing (never the whole logits at once), and
                # with the gradient of any part that learns on a loss of its own (dynamic patching's entropy model)
                loss = self.forward(x, loss="mean") / self.cfg.data.grad_accum
            loss.backward()
        except Exception as e:
            if not self.compile_pending:
                raise
            why = (str(e).strip().splitlines() or [""])[0][:200]
            self.log(f"warning: torch.compile failed ({type(e).__name__}: {why}); training uncompiled")
            self.compile_pending, self.forward = False, self.eager_forward
            self.optimizer.zero_grad(set_to_none=True)  # what a backward that failed part-way may have left
            return self._micro_step(x, sync)
        self.compile_pending = False
        return loss.item()

    def run(self, until_step: int | None = None) -> dict[str, Any]:
        """Train to max_steps (or `until_step`, or the time budget); returns the final metrics."""
        cfg = self.cfg
        self.write_run_info()
        self.log(f"bytelm {__version__} | {self.describe()} | seq_len {self.seq_len} | global batch "
                 f"{cfg.data.batch_size}x{cfg.data.grad_accum}x{self.world} windows ({self.batch_bytes:,} bytes) | "
                 f"device {self.device} | {self.split_info}")
        if self.sampler.skipped:
            self.log(f"note: {self.sampler.skipped:,} training clip(s) shorter than seq_len {self.seq_len:,} are never "
                     "drawn")
        self.before_training()
        limit = cfg.step_limit  # None: the time budget ends the run
        caps = [n for n in (limit, until_step) if n]  # until_step 0 or None: no extra cap, as before
        stop = min(caps) if caps else None
        bar = tqdm(total=stop, initial=self.step, disable=not (self.master and sys.stderr.isatty()),
                   unit="step", dynamic_ncols=True, leave=False)
        self.model.train()
        t_last, bytes_last, losses = time.perf_counter(), self.bytes_seen, []
        t_start, elapsed0 = time.perf_counter(), self.elapsed
        val = None
        while stop is None or self.step < stop:
            self.elapsed = elapsed0 + time.perf_counter() - t_start  # what the step's learning rate follows
            losses.append(self.train_step())
            self.elapsed = elapsed0 + time.perf_counter() - t_start
            bar.update(1)
            out_of_time = cfg.schedule.time_budget > 0 and self.env.agree(self.elapsed >= cfg.schedule.time_budget)
            last = self.step == stop or out_of_time
            if self.step % cfg.log_interval == 0 or last:
                now = time.perf_counter()
                loss = sum(losses) / len(losses)
                bps = (self.bytes_seen - bytes_last) / max(now - t_last, 1e-9)
                lr = self.lr  # the schedule's rate at the last step (a parameter group may scale it)
                of = f"/{limit}" if limit else ""
                msg = (f"step {self.step:>6}{of} | loss {loss:.4f} | bpb {loss / LN2:.3f} | "
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
            if self.bad_steps and last:
                raise TrainingDiverged(f"the run ended at step {self.step} on {self.bad_steps} non-finite step(s) in "
                                       f"a row; its last weights were not saved. {self.kept_checkpoint()}")
            if self.step % cfg.checkpointing.save_interval == 0 or last:
                self.save_due = True
                if self.bad_steps:
                    self.log(f"step {self.step}: no checkpoint after a non-finite step; the next finite one saves")
            if self.save_due and not self.bad_steps:
                self.save_checkpoint()
                self.save_due = False
            if self.step % cfg.eval_interval == 0 or self.step % cfg.checkpointing.save_interval == 0:
                t_last = time.perf_counter()  # keep evaluation and saving out of the next bytes/s figure
            if out_of_time:
                self.log(f"time budget of {cfg.schedule.time_budget:.0f}s reached at step {self.step}")
                break
        bar.close()
        if self.master:
            metrics.plot_metrics(self.out)
        return {"step": self.step, "master": self.master, "val_loss": val,
                "val_bpb": None if val is None else val / LN2, "elapsed": self.elapsed, "bytes_seen": self.bytes_seen}


def sample_text(model: ByteLM, prompt: str, n: int, seed: int) -> str:
    data = prompt.encode() + model.generate(prompt.encode(), n, temperature=0.8, top_k=64, seed=seed)
    return data.decode("utf-8", errors="replace")


def write_sample(model: ByteLM, media: Media, out: Path, seed: int) -> Path:
    """An image model's sample image, an audio model's second of sound (at most max_seq_len bytes), generated from
    nothing at temperature 1 (the model's own distribution) into out/sample.png or .wav."""
    n = media.seq_len if isinstance(media, ImageFormat) else min(media.bytes_per_second, model.config.max_seq_len)
    n -= n % getattr(media, "bytes_per_sample", 1)
    path = out / f"sample{files.suffix(media)}"
    atomic_write_bytes(path, files.to_file(model.generate(b"", n, temperature=1.0, seed=seed), media))
    return path


def train(cfg: RunConfig, resume: bool = False, log=log_line, trainer_class: type[Trainer] = Trainer
          ) -> dict[str, Any]:
    """Run (or resume) a training run end to end; print a sample when it is done (an image or audio model's is
    written to the run folder). A LoRA fine-tune is the same run with another `trainer_class`
    (bytelm.finetune.finetune)."""
    trainer = trainer_class(cfg, resume=resume, log=log)
    try:
        result = trainer.run()
        model = trainer.whole_model() if cfg.sample_bytes > 0 else None
        if trainer.master and cfg.sample_bytes > 0 and trainer.media is not None:
            log(f"sample: {write_sample(model, trainer.media, trainer.out, cfg.seed)}")
        elif trainer.master and cfg.sample_bytes > 0:
            n = min(cfg.sample_bytes, trainer.model_config.max_seq_len - len(cfg.sample_prompt.encode()))
            if n > 0:
                log("--- sample ---\n" + sample_text(model, cfg.sample_prompt, n, cfg.seed) + "\n--------------")
        return result
    finally:
        trainer.close()
