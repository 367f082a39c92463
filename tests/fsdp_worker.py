"""Run under torchrun by tests/test_fsdp.py: training runs one after another in one process group (each a
bytelm.training.Trainer on its settings), and each rank's training-state bytes. Argument: a JSON list of jobs,
{"settings": TrainConfig fields, "resume": bool} or {"measure": TrainConfig fields, "out": file}."""

from __future__ import annotations

import json
import sys

import torch

from bytelm.training import TrainConfig, Trainer
from bytelm.training.parallel import local


def state_bytes(trainer: Trainer) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state, after one forward, backward and step."""
    x = trainer.sampler.next_batch()
    trainer.forward(x, loss="mean").backward()
    params = [p for p in trainer.model.parameters()]
    grads = sum(local(p.grad).nbytes for p in params if p.grad is not None)
    trainer.optimizer.step()
    parts = getattr(trainer.optimizer, "parts", {"": trainer.optimizer}).values()
    moments = sum(local(v).nbytes for opt in parts for st in opt.state.values() for v in st.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"params": sum(local(p).nbytes for p in params), "grads": grads, "optimizer": moments}


def main(jobs: list[dict]) -> None:
    trainer = None
    for job in jobs:
        if "measure" in job:
            trainer = Trainer(TrainConfig.from_dict(job["measure"]), log=lambda *_: None)
            measured = state_bytes(trainer)
            with open(f"{job['out']}.{trainer.rank}", "w") as f:
                json.dump(measured, f)
        else:
            trainer = Trainer(TrainConfig.from_dict(job["settings"]), resume=job.get("resume", False))
            if trainer.master:
                for name, opt in getattr(trainer.optimizer, "parts", {}).items():
                    print(f"{name}: {type(opt).__name__}", flush=True)
            trainer.run()
    if trainer is not None:
        trainer.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
