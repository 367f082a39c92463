"""The optimizer, and its state as safetensors + JSON (no pickle)."""

from __future__ import annotations

from typing import Any

import torch


def make_optimizer(model: torch.nn.Module, cfg, stacks: dict[str, tuple[str, ...]] | None = None
                   ) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad. Decay matrices and embeddings, not norms, biases or the learned
    pad vectors (as in nanoGPT). Each group carries an `lr_scale`: parameters whose names start with a prefix of
    stacks["local"] (MEGABYTE's local model and output head) learn at cfg.local_lr_scale times the schedule's rate,
    the rest at 1x. A small local model trained at the global model's rate is under-trained: 2x was worth 0.2 bits
    per byte after 150 steps at two base rates, 4x (bytelm's default) another 0.05-0.15 (README, "What bytelm does
    differently"); megabyte-pytorch's local stack gains as much from it.

    Fused (one kernel over all parameters, not one op per tensor per update term) where the device has it: about
    3% of a CPU training step at the benchmark shape, the same update to float tolerance (1.8e-7 after 30 steps)."""
    local = (stacks or {}).get("local", ())
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = cfg.local_lr_scale if local and name.startswith(local) else 1.0
            groups.setdefault((p.dim() >= 2, scale), []).append(p)
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
                    for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    fused = all(p.device.type in ("cpu", "cuda") for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `optimizer_tensors`: a state_dict for `Optimizer.load_state_dict`."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}
