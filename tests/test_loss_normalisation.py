"""The shared engine's loss normalisation under gradient accumulation and several ranks: the gradient of an
optimizer step is the sum of the per-token cross-entropy over every target token of the global batch divided
by their number, whatever the per-device batch, accumulation count and world size, with and without
DeepSpeed. The reference is transformers' own causal-LM loss with ``num_items_in_batch`` (the same
normalisation as its Trainer) on one forward over all rows."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import grad_accum_driver as driver

REPO = Path(__file__).resolve().parent.parent

ATOL = 1e-6


def _reference() -> tuple[dict[str, torch.Tensor], float]:
    """One forward over all four rows (right-padded together); loss = sum of token cross-entropy / number of
    target tokens, by transformers' loss function with ``num_items_in_batch``."""
    from stages.batching import pad_collate

    model = driver.tiny_model()
    batch = pad_collate(0)(driver.rows())
    out = model(**batch, num_items_in_batch=torch.tensor(driver.target_count()))
    out.loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}, float(out.loss.detach())


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_rows_have_unequal_lengths_and_target_counts():
    from stages.batching import target_tokens

    rows = driver.rows()
    counts = [target_tokens({"labels": torch.tensor([r["labels"]])}) for r in rows]
    assert len({len(r["input_ids"]) for r in rows}) == 4 and len(set(counts)) == 4
    assert sum(counts) == driver.target_count() == 3 + 18 + 10 + 5


@pytest.mark.parametrize("batch,accumulation", [(4, 1), (1, 4), (2, 2)])
def test_accumulated_gradient_is_the_global_token_mean(tmp_path, batch, accumulation):
    reference, ref_loss = _reference()
    result = driver.accumulated_gradient(batch, accumulation, folder=tmp_path)
    assert sorted(result["rows"]) == [0, 1, 2, 3], "the step covers every row once"
    assert _max_diff(result["grads"], reference) < ATOL
    assert result["loss"] == pytest.approx(ref_loss, abs=ATOL)  # the logged loss is that mean too


def test_a_mean_of_micro_batch_means_differs(tmp_path):
    """Negative control: weighing every micro-batch the same (no loss units: the normalisation this replaces)
    is far from the reference at (1, 4), so the comparison above can tell them apart."""
    reference, _ = _reference()
    result = driver.accumulated_gradient(1, 4, per_token=False, folder=tmp_path)
    assert _max_diff(result["grads"], reference) > 100 * ATOL


@pytest.mark.parametrize("zero", ["zero1", "zero2"])
def test_deepspeed_accumulation_is_compensated(tmp_path, one_rank_process_group, zero):
    """DeepSpeed divides the loss by its accumulation count itself: at (1, 4) the gradient it holds at the
    boundary (gathered from its partitions) is still the global token mean."""
    pytest.importorskip("deepspeed")
    reference, ref_loss = _reference()
    result = driver.accumulated_gradient(1, 4, deepspeed=f"configs/deepspeed/{zero}.json", folder=tmp_path)
    assert result["engine"] == "DeepSpeedEngine"
    assert _max_diff(result["grads"], reference) < ATOL
    assert result["loss"] == pytest.approx(ref_loss, abs=ATOL)


def _torchrun(out: Path, specs: list[str]) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with socket.socket() as sock:  # torchrun's --master_port 0 hangs with static rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "tests.helpers.grad_accum_driver", str(out), *specs]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.distributed
def test_two_ranks_give_the_global_token_mean(tmp_path):
    """Two ranks (gloo): DDP at (2, 1) per rank, and DeepSpeed ZeRO-2 at (1, 2) per rank; each rank trains on
    different rows and holds the reference gradient (every rank divides by the token count of all ranks)."""
    reference, ref_loss = _reference()
    _torchrun(tmp_path, ["2,1", "1,2,configs/deepspeed/zero2.json"])
    for spec, engine in ((0, "plain"), (1, "DeepSpeedEngine")):
        ranks = [torch.load(tmp_path / f"spec{spec}-rank{r}.pt") for r in (0, 1)]
        assert all(r["world_size"] == 2 and r["engine"] == engine for r in ranks)
        assert sorted(ranks[0]["rows"] + ranks[1]["rows"]) == [0, 1, 2, 3], "each rank its own rows"
        for r in ranks:
            assert _max_diff(r["grads"], reference) < ATOL, (engine, r["rows"])
            assert r["loss"] == pytest.approx(ref_loss, abs=ATOL)


def test_loss_weight_hand_worked():
    """Two ranks x two micro-batches of 3, 9 | 6, 2 target tokens with mean losses 1, 2 | 3, 4: each rank's
    backward divides by the accumulation (2) and the ranks average, so the gradient is that of
    sum_i w_i m_i / 2 / 2, which must be the token mean (3 + 18 + 18 + 8) / 20 = 2.35."""
    from stages.training import loss_weight

    tokens, means = [[3, 9], [6, 2]], [[1.0, 2.0], [3.0, 4.0]]
    weights = [[loss_weight(n, 20, 2, 2) for n in rank] for rank in tokens]
    assert weights == [[pytest.approx(0.6), pytest.approx(1.8)], [pytest.approx(1.2), pytest.approx(0.4)]]
    per_rank = [sum(w * m for w, m in zip(ws, ms)) / 2 for ws, ms in zip(weights, means)]
    assert sum(per_rank) / 2 == pytest.approx(2.35)
    assert loss_weight(5, 5, 1, 1) == 1.0 and loss_weight(0, 0, 1, 1) == 0.0


def test_ppo_ptx_loss_is_a_token_mean_over_the_minibatch(tiny_cfg):
    """PPO's pretraining mix: the weighted PTX losses of a minibatch's micro-steps add up to transformers'
    loss with ``num_items_in_batch`` on all its PTX rows in one forward (a token mean, not a mean of the
    micro-batches' means)."""
    from pipeline.stage import StageRun
    from stages.batching import pad_collate, target_tokens
    from stages.engine import init_distributed
    from stages.ppo.trainer import PPOTrainer

    cfg = tiny_cfg("stages=[ppo]", "ppo.policy_from=base", "ppo.ptx_coef=0.1", "ppo.mini_batch_size=8",
                   "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]",
                   "ppo.gradient_accumulation_steps=2", "ppo.train.precision=fp32")
    with StageRun(cfg, "ppo", is_main=True) as run:
        tr = PPOTrainer(cfg, run, init_distributed())
        plan = list(tr._ptx_minibatch())
        assert len(plan) == 2 and tr.ptx_pos == 2
        with torch.no_grad():
            losses = [tr.actor(**batch, use_cache=False).loss for batch, _ in plan]
            ours = sum(float(loss) * weight for loss, (_, weight) in zip(losses, plan)) / 2
            rows = [tr.ptx_rows[i] for i in range(8)]  # the rows of ptx positions 0 and 1 on one rank
            batch = pad_collate(tr.tokenizer.pad_token_id)(rows)
            counts = [target_tokens(b) for b, _ in plan]
            assert counts[0] != counts[1] and sum(counts) == target_tokens(batch)
            reference = float(tr.actor(**batch, use_cache=False, num_items_in_batch=torch.tensor(sum(counts))).loss)
    assert ours == pytest.approx(reference, abs=1e-6)
    assert abs(sum(float(loss) for loss in losses) / 2 - reference) > 1e-4  # the mean of means is not it
