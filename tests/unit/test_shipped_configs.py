"""Every run config we ship loads, passes the memory planner, and names DeepSpeed JSONs that validate."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # validate_ds_config imports deepspeed

from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT, load_config
from pipeline.deepspeed_check import validate_ds_config
from pipeline.memory import device_memory_bytes, estimate

SKIP_DIRS = {"deepspeed", "constitutions"}
SHIPPED = sorted(
    p for p in (REPO_ROOT / "configs").rglob("*.y*ml")
    if not SKIP_DIRS & set(p.relative_to(REPO_ROOT / "configs").parts[:-1])
)


def test_examples_are_shipped() -> None:
    names = {p.name for p in SHIPPED}
    assert {"llama3-8b-lora-zero2-8gpu.yaml", "llama3-70b-zero3-offload-multinode.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO_ROOT / "configs")))
def test_config_loads_and_plans(path: Path) -> None:
    cfg = load_config(path)
    device = device_memory_bytes(cfg)
    for stage in cfg.stages:
        plan = estimate(cfg, stage)
        assert plan.total_bytes > 0
        assert plan.format()
        if cfg.launch.gpu_memory_gib is not None:
            plan.check(device)  # the examples are sized to fit the hardware they name


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO_ROOT / "configs")))
def test_deepspeed_jsons_validate_at_the_configs_world_size(path: Path) -> None:
    cfg = load_config(path)
    world = cfg.launch.nnodes * cfg.launch.nproc_per_node
    checks = []
    for stage in ("sft", "rm"):
        train = getattr(cfg, stage).train
        if train.deepspeed:
            checks.append((train.deepspeed, train.per_device_batch_size, train.gradient_accumulation_steps,
                           train.learning_rate, train.precision == "bf16", train.max_grad_norm))
    if cfg.ppo.train.deepspeed:
        train, sizes = cfg.ppo.train, cfg.ppo.sizes(world)
        checks.append((train.deepspeed, sizes.micro_batch, sizes.grad_accum, train.learning_rate,
                       train.precision == "bf16", train.max_grad_norm))
    for ds_path, micro, accum, lr, bf16, clip in checks:
        problems = validate_ds_config(ds_path, world, micro, accum, lr, bf16, max_grad_norm=clip)
        assert problems == [], "\n".join(problems)
