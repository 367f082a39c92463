"""Learning-rate schedules, over steps or over a time budget, whichever ends first.

A run ends at its step limit (`max_steps`; none by default when a `time_budget` is given) or when its time budget is
spent. The schedule follows whichever is nearer its end, so a `--time-budget 5m` run decays its learning rate to the
end of its five minutes instead of stopping half way down a cosine laid out over `max_steps` (a partly decayed model
is a worse one; see Hägele et al. 2024, arXiv 2405.18392, on schedules for runs whose length is not known).

    cosine  linear warm-up, then cosine decay to lr * min_lr_ratio at the end
    wsd     warm-up, stable at lr, then linear decay to lr * min_lr_ratio over the last `decay_fraction` of the run
            (warmup-stable-decay; Hu et al. 2024, arXiv 2404.06395)
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd")


def progress(step: int, schedule, elapsed: float = 0.0) -> float:
    """How far past warm-up the run is, in [0, 1]: by steps, or by time when the time budget is nearer its end.
    `schedule`: a run config's (bytelm.training.config.ScheduleSection)."""
    s, limit = schedule, schedule.step_limit
    p = 0.0 if limit is None else (step - s.warmup_steps) / max(1, limit - s.warmup_steps)
    if s.time_budget > 0:
        p = max(p, elapsed / s.time_budget)
    return min(1.0, max(0.0, p))


def lr_at(step: int, cfg, elapsed: float = 0.0) -> float:
    """The learning rate for optimizer step `step`, `elapsed` seconds into the run (see the module docstring); `cfg`:
    the run config, whose schedule shapes its optimizer's peak rate."""
    s, lr = cfg.schedule, cfg.optimizer.lr
    if step < s.warmup_steps:
        return lr * (step + 1) / s.warmup_steps
    p = progress(step, s, elapsed)
    min_lr = lr * s.min_lr_ratio
    if s.name == "wsd":
        stable_until = 1.0 - s.decay_fraction
        if p <= stable_until:
            return lr
        return min_lr + (lr - min_lr) * (1.0 - p) / max(s.decay_fraction, 1e-12)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p))
