import math

SCHEDULE_KEYS = ("lr", "steps", "warmup", "schedule", "min_lr_ratio", "decay_fraction")  # what learning_rate reads


def learning_rate(step: int, *, lr: float, steps: int, warmup: int, schedule: str, min_lr_ratio: float,
                  decay_fraction: float) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine, WSD (warmup-stable-decay) or constant."""
    if step < warmup:
        return lr * (step + 1) / warmup
    floor = lr * min_lr_ratio
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = (step - warmup) / max(steps - warmup - 1, 1)  # the last step (steps - 1) runs at the floor
        return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = steps - int(decay_fraction * steps)  # wsd: flat, then a linear decay over the last steps
    if step < decay_start:
        return lr
    return lr - (lr - floor) * (step - decay_start + 1) / max(steps - decay_start, 1)
