"""Run under torchrun by tests/test_fsdp.py: training runs one after another in one process group (each a
bytelm.training.Trainer on its settings), and each rank's training-state bytes. Argument: a JSON list of jobs,
{"settings": TrainConfig fields, "resume": bool} or {"measure": TrainConfig fields, "out": file}."""

from __future__ import annotations

import json
import sys

from bytelm.training import TrainConfig, Trainer
from bytelm.training.memory import held_bytes


def state_bytes(trainer: Trainer) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state, after one forward, backward and step."""
    trainer.forward(trainer.sampler.next_batch(), loss="mean").backward()
    trainer.optimizer.step()
    return held_bytes(trainer.model, trainer.optimizer)


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
