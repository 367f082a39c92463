"""The optimizer (Muon for the transformer blocks' matrices and AdamW for the rest, or AdamW for all), and its state
as safetensors + JSON (no pickle)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .precision import cpu_has_native_bf16

OPTIMIZERS = ("muon", "adamw")


def in_blocks(name: str) -> bool:
    """A parameter of a transformer block (bytelm.nn.TransformerStack's `blocks`): what Muon trains."""
    return ".blocks." in f".{name}"


class MuonAdamW:
    """Muon for the blocks' weight matrices and AdamW for everything else (embeddings, pads, norms, the output head,
    MEGABYTE's global-to-local projection), stepped as one optimizer. `param_groups` is both optimizers' groups (the
    same dicts), so a schedule that sets each group's lr reaches both."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.parts = {"muon": muon, "adamw": adamw}

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # read afresh: load_state_dict replaces each part's groups
        return [g for opt in self.parts.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.parts.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if set(sd) != set(self.parts):
            raise ValueError(f"a state of optimizers {sorted(sd)}, not {sorted(self.parts)}")
        for name, opt in self.parts.items():
            opt.load_state_dict(sd[name])


def newton_schulz_fp32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                       eps: float) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation (torch/optim/_muon.py, `_zeropower_via_newtonschulz`: the same quintic
    Newton-Schulz iteration) in float32 rather than bfloat16."""
    a, b, c = ns_coefficients
    x = grad.float()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


class Fp32Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iteration in float32, for CPUs without bf16 matrix instructions. There
    torch's bfloat16 matmuls are emulated: on a 2-core AVX2 machine the optimizer step took 9.1 s of a 9.8 s training
    step (bytelm small, batch 8 x 1024), 15x AdamW's whole step; in float32 it is a small part of the step (README).
    The state is torch.optim.Muon's: checkpoints move between the two freely."""

    @torch.no_grad()
    def step(self, closure=None):
        import torch.optim._muon as muon_module  # the function is looked up there at each step

        if not hasattr(muon_module, "_zeropower_via_newtonschulz"):  # a torch that moved it: bf16, slow but right
            return super().step(closure)
        saved, muon_module._zeropower_via_newtonschulz = muon_module._zeropower_via_newtonschulz, newton_schulz_fp32
        try:
            return super().step(closure)
        finally:
            muon_module._zeropower_via_newtonschulz = saved


def orthogonalise(update: torch.Tensor, ns_coefficients, ns_steps: int, eps: float) -> torch.Tensor:
    """Muon's Newton-Schulz orthogonalisation, as Fp32Muon or torch.optim.Muon runs it on this device."""
    if update.device.type == "cpu" and not cpu_has_native_bf16():
        return newton_schulz_fp32(update, ns_coefficients, ns_steps, eps)
    from torch.optim._muon import _zeropower_via_newtonschulz

    return _zeropower_via_newtonschulz(update, ns_coefficients, ns_steps, eps)


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon for FSDP2's parameters, each sharded on dim 0 across the ranks (DTensors). Momentum is
    element-wise, so each rank updates its own rows; Newton-Schulz needs the whole matrix: each matrix has an owner
    rank (round robin over the matrices, so the work is spread), which gathers the rows of the momentum update,
    orthogonalises it and scatters each rank its rows back: one gather and one scatter of the matrix, and each
    orthogonalisation done once, not on every rank (torchtitan's and Moonlight's scheme; Megatron refuses Muon with
    FSDP). The update equals single-process Muon's to float tolerance (tests/test_fsdp.py). The state is
    torch.optim.Muon's, with the momentum sharded like its parameter, so sharded checkpoints reshard it."""

    @torch.no_grad()
    def step(self, closure=None):
        import torch.distributed as dist
        from torch.optim._muon import _adjust_lr

        loss = closure() if closure is not None else None
        rank, world = dist.get_rank(), dist.get_world_size()
        n = 0  # matrices seen, for the round robin
        for group in self.param_groups:
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                buf = state["momentum_buffer"]
                buf = buf.to_local() if isinstance(buf, DTensor) else buf
                buf.lerp_(grad, 1 - momentum)  # torch/optim/_muon.py, _single_tensor_muon
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                owner, n = n % world, n + 1
                update = _owner_orthogonalises(update, p.shape, owner, rank, world,
                                               lambda u, g=group: orthogonalise(u, g["ns_coefficients"],
                                                                                g["ns_steps"], g["eps"]))
                mine = p.to_local() if isinstance(p, DTensor) else p
                mine.mul_(1 - lr * wd)
                mine.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def _owner_orthogonalises(rows: torch.Tensor, shape: torch.Size, owner: int, rank: int, world: int,
                          orthogonalise_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """This rank's `rows` of a (shape) matrix sharded on dim 0 in torch.chunk's way (FSDP2's: ceil(rows / world)
    per rank, the last ranks' shorter or empty), orthogonalised whole on the `owner` rank and its rows sent back.
    gather and scatter take equal-sized tensors: each shard is padded to the chunk size."""
    import torch.distributed as dist

    chunk = -(-shape[0] // world)
    padded = rows.new_zeros((chunk, *shape[1:]))
    padded[: rows.shape[0]] = rows
    shards = [torch.empty_like(padded) for _ in range(world)] if rank == owner else None
    dist.gather(padded, shards, dst=owner)
    pieces = None
    if rank == owner:
        whole = orthogonalise_fn(torch.cat(shards)[: shape[0]]).to(rows.dtype)
        pieces = [whole.new_zeros(padded.shape) for _ in range(world)]
        for r, piece in enumerate(whole.split(chunk)):
            pieces[r][: piece.shape[0]] = piece
    out = torch.empty_like(padded)
    dist.scatter(out, pieces, src=owner)
    return out[: rows.shape[0]]


def make_optimizer(model: torch.nn.Module, cfg, stacks: dict[str, tuple[str, ...]] | None = None,
                   hidden: Callable[[str], bool] = in_blocks) -> torch.optim.Optimizer | MuonAdamW:
    """The optimizer over the parameters that require grad, of `cfg`, a run config's optimizer section
    (bytelm.training.config.OptimizerSection): name "adamw" (AdamW for all) or "muon" (Muon
    for the weight matrices of the parameters named `hidden`, the transformer blocks', and AdamW for the rest).

    Muon (Jordan et al. 2024; torch.optim.Muon) orthogonalises each matrix's momentum by Newton-Schulz iterations;
    its update is scaled to AdamW's RMS (`adjust_lr_fn="match_rms_adamw"`, Liu et al. 2025, arXiv 2502.16982), so
    one learning rate and schedule serve both. At the benchmark shape it was worth 0.24 bits per byte after 150 steps
    (2 seeds) for ~15% more time per step in fp32 (docs/logbook.md, bytelm 0.4).

    AdamW decays matrices and embeddings, not norms, biases or the learned pad vectors (as in nanoGPT); Muon decays
    its matrices. Each group carries an `lr_scale`: parameters whose names start with a prefix of stacks["local"]
    (MEGABYTE's local model and output head) learn at cfg.local_lr_scale times the schedule's rate, the rest at 1x.
    A small local model trained at the global model's rate is under-trained: 2x was worth 0.2 bits per byte after
    150 steps at two base rates, 4x (bytelm's default) another 0.05-0.15 (README); megabyte-pytorch's local stack
    gains as much from it.

    AdamW is fused (one kernel over all parameters, not one op per tensor per update term) where the device has it:
    about 3% of a CPU training step at the benchmark shape, the same update to float tolerance."""
    local = (stacks or {}).get("local", ())
    muon = cfg.name == "muon"
    groups: dict[tuple[bool, bool, float], list[torch.nn.Parameter]] = {}  # (by Muon, decayed, lr scale) -> params
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = cfg.local_lr_scale if local and name.startswith(local) else 1.0
            by_muon = muon and p.dim() == 2 and hidden(name)
            groups.setdefault((by_muon, p.dim() >= 2, scale), []).append(p)
    ordered = sorted(groups.items(), key=lambda kv: (not kv[0][0], not kv[0][1], kv[0][2]))
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
                    for (by_muon, decay, scale), ps in ordered if not by_muon]
    muon_groups = [{"params": ps, "lr_scale": scale} for (by_muon, _, scale), ps in ordered if by_muon]
    on_cpu = all(p.device.type == "cpu" for g in muon_groups for p in g["params"])
    sharded = any(isinstance(p, DTensor) for g in muon_groups for p in g["params"])
    muon_class = ShardedMuon if sharded else Fp32Muon if on_cpu and not cpu_has_native_bf16() else torch.optim.Muon
    by_muon = muon_class(muon_groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         adjust_lr_fn="match_rms_adamw") if muon_groups else None
    if by_muon is not None and not param_groups:  # everything trained is a block matrix (e.g. some LoRA fine-tunes)
        return by_muon
    fused = all(p.device.type in ("cpu", "cuda") for g in param_groups for p in g["params"])
    adamw = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    return adamw if by_muon is None else MuonAdamW(by_muon, adamw)


def _split(sd: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_tensors(opt) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON metadata: no pickle. A MuonAdamW's
    parts are kept apart: tensors `opt.<part>.<index>.<name>`, metadata {"parts": {part: ...}}."""
    if isinstance(opt, MuonAdamW):
        tensors, parts = {}, {}
        for name, sd in opt.state_dict().items():
            t, parts[name] = _split(sd, f"opt.{name}.")
            tensors.update(t)
        return tensors, {"parts": parts}
    return _split(opt.state_dict(), "opt.")


def _join(tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix):
            idx, name = key[len(prefix):].split(".", 1)
            if idx.isdigit():
                state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `optimizer_tensors`: a state_dict for the optimizer's `load_state_dict`."""
    if "parts" in meta:
        return {name: _join(tensors, m, f"opt.{name}.") for name, m in meta["parts"].items()}
    return _join(tensors, meta, "opt.")


def state_shape_problems(opt, sd: dict[str, Any]) -> list[str]:
    """Every saved moment whose shape differs from its parameter's (torch's load_state_dict takes them as they are,
    and the next step fails deep inside torch or, broadcast, trains on nonsense)."""
    if isinstance(opt, MuonAdamW):
        return [p for name, part in opt.parts.items() for p in state_shape_problems(part, sd.get(name, {}))]
    params = [p for g in opt.param_groups for p in g["params"]]
    saved = [i for g in sd.get("param_groups", []) for i in g.get("params", [])]
    by_id = dict(zip(saved, params, strict=False))
    problems = []
    for idx, st in sd.get("state", {}).items():
        p = by_id.get(idx)
        for k, v in st.items():
            if p is not None and isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                problems.append(f"{k} of parameter {idx}: {tuple(v.shape)} vs {tuple(p.shape)}")
    return problems
