"""Two-process DeepSpeed ZeRO-2 SFT on CPU (gloo), with the checks of ../shared/notes/distributed-on-cpu.md:
every rank is a world-size-2 DeepSpeed engine, ranks see different data, parameters are identical across
ranks, they match a 1-process run on the same global batch, and an unsynchronised run fails the same
check (negative control)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parent.parent
DRIVER = "tests.helpers.dist_engine_driver"  # run as a module from the repository root


def _uniform_data(path: Path) -> Path:
    """Eight conversations that tokenize to the same length and the same number of target tokens, so
    per-rank mean losses average to the global mean exactly (otherwise 2 x micro 4 and 1 x micro 8
    legitimately differ by token weighting)."""
    import itertools
    import string

    from pipeline.config import load_config
    from pipeline.models import load_tokenizer, prepare_base
    from stages.sft import IGNORE, tokenize_sft

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    tok = load_tokenizer(prepare_base(cfg.model), cfg.model)
    groups: dict = {}
    for a, b in itertools.product(string.ascii_lowercase, repeat=2):
        messages = [{"role": "user", "content": f"Say {a}{b}."}, {"role": "assistant", "content": f"{a}{b}."}]
        row = tokenize_sft(tok, messages, 128)
        key = (len(row["input_ids"]), sum(x != IGNORE for x in row["labels"]))
        groups.setdefault(key, []).append({"messages": messages})
    rows = max(groups.values(), key=len)[:8]
    assert len(rows) == 8
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _torchrun(out: Path, overrides: list[str], unsync: bool = False) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    import socket

    with socket.socket() as sock:  # torchrun's --master_port 0 hangs with static rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", DRIVER, str(REPO / "configs" / "tiny.yaml"), str(out), *overrides]
    if unsync:
        cmd.append("--unsync")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_process_zero2_sft_matches_one_process(tmp_path, tiny_cfg):
    data = _uniform_data(tmp_path / "uniform.jsonl")
    common = [f"sft.data.path={data}", "sft.eval_fraction=0", "sft.train.max_steps=4",
              "sft.train.warmup_ratio=0", "sft.train.learning_rate=1e-2", "sft.train.save_steps=100",
              "logging.progress_bar=false"]
    # two processes, DeepSpeed ZeRO-2, micro 4 each = global batch 8
    ds_out = tmp_path / "ds"
    _torchrun(ds_out, common + [f"output_root={tmp_path / 'o-ds'}", "sft.train.per_device_batch_size=4",
                                "sft.train.deepspeed=configs/deepspeed/zero2.json"])
    ranks = [json.loads((ds_out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for info in ranks:
        assert info["world_size"] == 2 and info["engine"] == "DeepSpeedEngine" and info["zero_stage"] == 2
        assert info["steps"] == 4
    seen0, seen1 = set(ranks[0]["indices"][0]), set(ranks[1]["indices"][0])
    assert seen0 and seen1 and seen0 != seen1, "ranks must see different data"
    p0, p1 = torch.load(ds_out / "rank0.pt"), torch.load(ds_out / "rank1.pt")
    assert _max_param_diff(p0, p1) == 0.0, "parameters differ across ranks"

    # one process, same global batch (micro 8), same steps
    from stages import sft

    single = tiny_cfg(*[c for c in common if not c.startswith("logging")], "run_name=single",
                      "sft.train.per_device_batch_size=8")
    sft.run(single)
    from safetensors.torch import load_file

    ref = load_file(single.stage_dir("sft") / "model" / "model.safetensors")
    assert _max_param_diff({k: p0[k] for k in ref}, {k: v.float() for k, v in ref.items()}) < 1e-5
    # rank 0 saved the same weights it trained
    saved = load_file(tmp_path / "o-ds" / "tiny" / "sft" / "model" / "model.safetensors")
    assert _max_param_diff({k: p0[k] for k in saved}, {k: v.float() for k, v in saved.items()}) < 1e-6

    # negative control: the same launch without synchronisation must fail the same check
    bad_out = tmp_path / "unsync"
    _torchrun(bad_out, common + [f"output_root={tmp_path / 'o-bad'}", "sft.train.per_device_batch_size=4"],
              unsync=True)
    b0, b1 = torch.load(bad_out / "rank0.pt"), torch.load(bad_out / "rank1.pt")
    assert _max_param_diff(b0, b1) > 1e-4, "negative control: unsynchronised ranks should diverge"
