"""Learning-rate schedule: linear warmup from 0 to the peak, then cosine decay to min_lr_ratio * peak.

A pure function of the step, so a resumed run follows exactly the curve of an uninterrupted one."""
import math


def lr_at(step, *, peak_lr, total_steps, warmup_steps, min_lr_ratio=0.1):
    """Learning rate of optimizer step `step` (0-based) of a run of `total_steps` steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
