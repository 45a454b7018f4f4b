"""The shipped DeepSpeed JSONs validate offline; broken ones are refused with a message naming the key."""

from __future__ import annotations

import os

# Before anything imports deepspeed: this machine has no GPU (see ../shared/notes/distributed-on-cpu.md).
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import json
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT, load_config
from pipeline.deepspeed_check import (
    check_top_level_keys,
    fill_auto,
    load_ds_config,
    needs_ds_cpu_adam,
    run_initialize_check,
    validate_ds_config,
    zero_settings,
)

DS_DIR = REPO_ROOT / "configs" / "deepspeed"
DS_JSONS = sorted(DS_DIR.glob("*.json"))
EXAMPLES = sorted((REPO_ROOT / "configs" / "examples").glob("*.yaml"))


def _example_world_sizes() -> list[int]:
    sizes = {load_config(p).launch.nnodes * load_config(p).launch.nproc_per_node for p in EXAMPLES}
    return sorted(sizes | {2})


WORLD_SIZES = _example_world_sizes()


def test_expected_files_shipped() -> None:
    names = {p.name for p in DS_JSONS}
    assert {"zero1.json", "zero2.json", "zero3.json", "zero2_offload.json", "zero3_offload.json"} <= names
    assert {8, 32} <= set(WORLD_SIZES), "the example configs should name 8 and 32 devices"


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_shipped_json_conventions(path: Path) -> None:
    cfg = load_ds_config(path)
    # Naming an optimizer forces a multi-minute fused_adam compile; we pass a torch optimizer instead.
    assert "optimizer" not in cfg and "scheduler" not in cfg
    assert cfg["bf16"] == {"enabled": "auto"}
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert cfg[key] == "auto", key
    stage, offload_opt, offload_param = zero_settings(cfg)
    expected_stage = int(path.stem[len("zero")])
    assert stage == expected_stage
    assert offload_opt == ("offload" in path.stem)
    assert offload_param == (path.stem == "zero3_offload")
    assert needs_ds_cpu_adam(cfg) == offload_opt


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_shipped_json_validates(path: Path, world_size: int) -> None:
    for bf16 in (True, False):
        problems = validate_ds_config(path.relative_to(REPO_ROOT), world_size, 4, 2, 1e-5, bf16)
        assert problems == [], "\n".join(problems)


def _write(tmp_path: Path, name: str, cfg: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture
def zero2() -> dict:
    return load_ds_config(DS_DIR / "zero2.json")


def test_top_level_typo_is_named_with_hint(tmp_path: Path, zero2: dict) -> None:
    broken = {("zero_optimisation" if k == "zero_optimization" else k): v for k, v in zero2.items()}
    path = _write(tmp_path, "typo.json", broken)
    problems = validate_ds_config(path, 2, 4, 1, 1e-5, True)
    assert any(
        str(path) in p and "unknown top-level key 'zero_optimisation'" in p and "did you mean 'zero_optimization'" in p
        for p in problems
    ), problems
    assert check_top_level_keys(zero2) == []


def test_zero_stage_4_is_refused(tmp_path: Path, zero2: dict) -> None:
    zero2["zero_optimization"]["stage"] = 4
    path = _write(tmp_path, "stage4.json", zero2)
    problems = validate_ds_config(path, 2, 4, 1, 1e-5, True)
    assert any(str(path) in p and "zero_optimization.stage" in p and "got 4" in p for p in problems), problems


def test_typo_inside_zero_optimization_is_named(tmp_path: Path, zero2: dict) -> None:
    zero2["zero_optimization"]["overlap_comn"] = True
    path = _write(tmp_path, "inner.json", zero2)
    problems = validate_ds_config(path, 2, 4, 1, 1e-5, True)
    assert any("zero_optimization.overlap_comn" in p and "did you mean 'zero_optimization.overlap_comm'" in p
               for p in problems), problems


def test_bad_offload_device_is_refused(tmp_path: Path) -> None:
    cfg = load_ds_config(DS_DIR / "zero3_offload.json")
    cfg["zero_optimization"]["offload_param"]["device"] = "gpu"
    path = _write(tmp_path, "offload.json", cfg)
    problems = validate_ds_config(path, 2, 4, 1, 1e-5, True)
    assert any("zero_optimization.offload_param.device" in p for p in problems), problems


def test_fp16_and_bf16_both_on_is_refused(tmp_path: Path, zero2: dict) -> None:
    zero2["fp16"] = {"enabled": True}
    zero2["bf16"] = {"enabled": True}
    path = _write(tmp_path, "both.json", zero2)
    problems = validate_ds_config(path, 2, 4, 1, 1e-5, True)
    assert any("fp16.enabled and bf16.enabled are both true" in p for p in problems), problems
    assert any("DeepSpeed parser" in p and "bfloat16 and fp16 modes cannot be simultaneously enabled" in p
               for p in problems), problems


def test_batch_arithmetic_mismatch_at_cluster_world_size(tmp_path: Path, zero2: dict) -> None:
    # 64 = 4 x 2 x 8 is right on 8 GPUs and wrong on 2: the check must use the cluster's world size.
    zero2["train_batch_size"] = 64
    path = _write(tmp_path, "batch.json", zero2)
    assert validate_ds_config(path, 8, 4, 2, 1e-5, True) == []
    problems = validate_ds_config(path, 2, 4, 2, 1e-5, True)
    assert any("train_batch_size=64 != micro batch 4 x grad accumulation 2 x world size 2 = 16" in p
               for p in problems), problems
    assert any("DeepSpeed parser (world size 2)" in p and "64 != 4 * 2 * 2" in p for p in problems), problems
    assert any("transformers finalisation" in p and "train_batch_size" in p for p in problems), problems


def test_lr_and_precision_mismatch_found_by_hf_layer(tmp_path: Path, zero2: dict) -> None:
    zero2["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    zero2["bf16"] = {"enabled": True}
    path = _write(tmp_path, "lr.json", zero2)
    problems = validate_ds_config(path, 2, 4, 1, 1e-5, False)
    assert any("transformers finalisation" in p and "optimizer.params.lr" in p for p in problems), problems
    assert any("bf16.enabled=True contradicts the run's value False" in p for p in problems), problems


def test_unreadable_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "train_batch_size": "auto",\n  oops\n}')
    (problem,) = validate_ds_config(path, 2, 4, 1, 1e-5, True)
    assert f"{path}:3: invalid JSON" in problem


def test_validation_leaves_no_global_hf_state() -> None:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    assert validate_ds_config(DS_DIR / "zero3.json", 2, 4, 1, 1e-5, True) == []
    # HF keeps a global weakref to the last DeepSpeed config; left set, later from_pretrained calls
    # in this process would try ZeRO-3 init.
    assert not is_deepspeed_zero3_enabled()


# ------------------------------------------------------------------------------------------ fill_auto
def test_fill_auto_fills_everything(zero2: dict) -> None:
    filled = fill_auto(zero2, micro_batch=4, grad_accum=2, world_size=8, lr=1e-5, max_grad_norm=1.0, bf16=True,
                       hidden_size=64)
    assert filled["train_batch_size"] == 64
    assert filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["gradient_accumulation_steps"] == 2
    assert filled["gradient_clipping"] == 1.0
    assert filled["bf16"] == {"enabled": True}
    assert filled["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert zero2["train_batch_size"] == "auto", "the input must not be modified"
    none_clip = fill_auto(zero2, micro_batch=1, grad_accum=1, world_size=1, lr=1e-5, max_grad_norm=None, bf16=False)
    assert none_clip["gradient_clipping"] == 0.0 and none_clip["bf16"] == {"enabled": False}
    assert none_clip["zero_optimization"]["reduce_bucket_size"] == 500_000_000  # DeepSpeed's default


def test_fill_auto_zero3_buckets() -> None:
    filled = fill_auto(load_ds_config(DS_DIR / "zero3.json"), micro_batch=1, grad_accum=1, world_size=2, lr=1e-5,
                       max_grad_norm=1.0, bf16=True, hidden_size=100)
    zero = filled["zero_optimization"]
    assert (zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (9000, 1000)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"train_batch_size": 10}, "train_batch_size"),
        ({"train_micro_batch_size_per_gpu": 3}, "train_micro_batch_size_per_gpu"),
        ({"gradient_clipping": 0.5}, "gradient_clipping"),
        ({"bf16": {"enabled": False}}, "bf16.enabled"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": "auto"}}, "fp16.enabled"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, "optimizer.params.lr"),
        ({"scheduler": {"type": "WarmupLR", "params": {"total_num_steps": "auto"}}},
         "scheduler.params.total_num_steps"),
    ],
)
def test_fill_auto_contradictions_name_the_key(zero2: dict, change: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        fill_auto({**zero2, **change}, micro_batch=4, grad_accum=2, world_size=2, lr=1e-5, max_grad_norm=1.0,
                  bf16=True)


def test_fill_auto_rejects_nonpositive_sizes(zero2: dict) -> None:
    with pytest.raises(ValueError, match="world_size"):
        fill_auto(zero2, micro_batch=4, grad_accum=1, world_size=0, lr=1e-5, max_grad_norm=1.0, bf16=True)


# ----------------------------------------------------------------------------- layer 4: initialize
# Each subprocess takes ~7-10 s (imports; nothing is compiled: skip_comm_op_build).
@pytest.mark.slow
def test_initialize_and_one_step_zero2() -> None:
    assert run_initialize_check(DS_DIR / "zero2.json") == []


def test_initialize_compiles_no_deepspeed_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """deepspeed.initialize + a ZeRO-2 step with our torch AdamW builds no DeepSpeed op: every C/C++ compiler on
    PATH fails loudly and TORCH_EXTENSIONS_DIR, where a JIT build would land, stays empty. (DeepSpeed's torch
    backend used to compile its shm comm op here: a minute of cc1plus on a fresh machine.)"""
    extensions, no_compiler = tmp_path / "torch_extensions", tmp_path / "bin"
    extensions.mkdir()
    no_compiler.mkdir()
    for name in ("c++", "g++", "gcc", "cc", "x86_64-linux-gnu-g++", "x86_64-linux-gnu-gcc"):
        tool = no_compiler / name
        tool.write_text('#!/bin/sh\necho "compiler called: $0 $*" >&2\nexit 1\n')
        tool.chmod(0o755)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    monkeypatch.setenv("PATH", f"{no_compiler}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CC", str(no_compiler / "gcc"))
    monkeypatch.setenv("CXX", str(no_compiler / "c++"))
    assert run_initialize_check(DS_DIR / "zero2.json", timeout_s=120) == []
    assert sorted(p.name for p in extensions.iterdir()) == []


@pytest.mark.slow
def test_initialize_catches_unknown_optimizer_type(tmp_path: Path, zero2: dict) -> None:
    zero2["optimizer"] = {"type": "AdamWW", "params": {"lr": "auto"}}
    path = _write(tmp_path, "opt.json", zero2)
    assert validate_ds_config(path, 2, 4, 1, 1e-5, True) == [], "layers 1-3 cannot see this one"
    problems = run_initialize_check(path)
    assert len(problems) == 1 and str(path) in problems[0] and "AdamWW" in problems[0], problems
