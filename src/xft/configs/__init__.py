"""Configuration files shipped with xft (package data).

`accelerate/{ddp,fsdp,deepspeed_zero3}.yaml`: `accelerate launch --config_file` files
for multi-GPU training on one node (docs/training.md).
"""

from __future__ import annotations

from pathlib import Path

ACCELERATE_CONFIGS = ("ddp", "fsdp", "deepspeed_zero3")


def accelerate_config(name: str) -> str:
    """Path of the shipped accelerate config `name` (one of ACCELERATE_CONFIGS)."""
    if name not in ACCELERATE_CONFIGS:
        raise ValueError(f"unknown accelerate config {name!r}; choose one of {', '.join(ACCELERATE_CONFIGS)}")
    return str(Path(__file__).with_name("accelerate") / f"{name}.yaml")

