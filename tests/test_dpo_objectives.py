"""The DPO stage's newer objectives on the tiny model: KTO, ORPO and SimPO learn the toy task, ORPO and SimPO never
load or run a reference, KTO trains on unpaired rows, and each loss equals TRL 1.16's on identical tensors
(the pure math: tests/unit/test_dpo_objective_math.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from stages.dpo import trainer as dpo_stage
from stages.dpo.config import DPOConfig
from tests.helpers.common import marker_preferences, write_jsonl

# the tiny config's dpo section sets beta 0.1: orpo has none, and simpo takes its own default (2.0)
LOSS_SETTINGS = {"sigmoid": ["dpo.loss=sigmoid"], "kto": ["dpo.loss=kto"], "orpo": ["dpo.loss=orpo", "dpo.beta=null"],
                 "simpo": ["dpo.loss=simpo", "dpo.beta=null"]}


def _marker_run(tiny_cfg, tmp_path, loss: str, *extra: str):
    """30 steps of ``loss`` on 120 marker pairs (20% of the prompts held out), from the tiny base model."""
    path = write_jsonl(tmp_path / "marker.jsonl", marker_preferences(120))
    return tiny_cfg(f"dpo.data.path={path}", "dpo.init_from=base", "stages=[dpo]", "dpo.eval_fraction=0.2",
                    "dpo.train.max_steps=30", "dpo.train.learning_rate=2e-3", "dpo.train.eval_steps=10",
                    *LOSS_SETTINGS[loss], *extra)


# ------------------------------------------------------------------------------------------ learning
@pytest.mark.parametrize("loss", ["kto", "orpo", "simpo"])
def test_each_objective_learns_the_marker_preference(tmp_path, tiny_cfg, loss):
    """30 steps on pairs whose chosen response ends with 'thanks': held-out pairs (prompts never trained on) are
    ranked by each objective's own reward (KTO: beta (logp - ref) of the pair's two rows; ORPO: log odds, SimPO:
    beta x per-token mean logp), and the policy itself moved towards the chosen responses."""
    cfg = _marker_run(tiny_cfg, tmp_path, loss)
    metrics = dpo_stage.run(cfg)
    assert metrics["eval_accuracy"] >= 0.8 and metrics["eval_margin"] > 0, metrics
    rows = [json.loads(line) for line in (cfg.stage_dir("dpo") / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    manifest = json.loads((cfg.stage_dir("dpo") / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["dpo_loss"]["loss"] == loss
    if loss == "kto":  # the pairs were unpaired: one desirable and one undesirable row each
        assert metrics["desirable_rows"] == metrics["undesirable_rows"] == metrics["train_rows"] // 2
        assert metrics["eval_rows"] == 2 * metrics["eval_pairs"] and "kl" in rows[0]
        # the summed log-prob of the (longer) chosen responses rose against the rejected ones'
        assert metrics["eval_logp_margin"] > metrics["reference_eval_logp_margin"] + 1.0, metrics
    else:  # no reference, so nothing of it to report; the chosen responses' NLL is logged
        assert "reference_eval_logp_margin" not in metrics and metrics["nll"] > 0


def test_kto_trains_on_unpaired_rows(tmp_path, tiny_cfg):
    """TRL's unpaired format: each row a prompt, a completion and a label, no pairs. Desirable rows end with
    'thanks'; after training the held-out desirable rows' rewards are above the undesirable ones', most rows are
    on their label's side of beta z0, and there is no pair metric to report."""
    rows = []
    for i, pair in enumerate(marker_preferences(160, seed=1)):
        good = i % 2 == 0  # each prompt gives one row, alternately desirable or not
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good})
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = tiny_cfg(f"dpo.data.path={path}", "dpo.init_from=base", "stages=[dpo]", "dpo.eval_fraction=0.2",
                   "dpo.train.max_steps=30", "dpo.train.learning_rate=2e-3", "dpo.loss=kto")
    metrics = dpo_stage.run(cfg)
    assert metrics["eval_reward_desirable"] > metrics["eval_reward_undesirable"] + 0.5, metrics
    assert metrics["eval_label_accuracy"] >= 0.8, metrics
    assert "eval_accuracy" not in metrics and "eval_pairs" not in metrics
    assert metrics["train_rows"] + metrics["eval_rows"] == 160


# ------------------------------------------------------------------------------- no reference model
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("loss", ["orpo", "simpo", "sigmoid"])
def test_orpo_and_simpo_never_load_or_run_a_reference(tmp_path, tiny_cfg, monkeypatch, loss, method):
    """Counted: model loads (only the policy, once), reference forwards (``compute_reference``), adapter-disabled
    passes (the LoRA reference) and reference caches. ORPO and SimPO have none of them; DPO (the control) has."""
    calls = {"load_model": 0, "compute_reference": 0, "reference_context": 0, "ReferenceCache": 0}

    def counting(module, name):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    import stages.context

    counting(stages.context, "load_model")
    for name in ("compute_reference", "reference_context", "ReferenceCache"):
        counting(dpo_stage, name)
    cfg = _marker_run(tiny_cfg, tmp_path, loss, "dpo.train.max_steps=3", f"dpo.tuning.method={method}")
    metrics = dpo_stage.run(cfg)
    manifest = json.loads((cfg.stage_dir("dpo") / "manifest.json").read_text())
    assert calls["load_model"] == 1
    if loss == "sigmoid":
        assert calls["compute_reference"] > 0 and calls["ReferenceCache"] == 1
        assert calls["reference_context"] == calls["compute_reference"]
        return
    assert calls == {"load_model": 1, "compute_reference": 0, "reference_context": 0, "ReferenceCache": 0}
    assert manifest["reference"].startswith("none: dpo.loss=")
    assert "reference_train_pairs" not in metrics and metrics["steps"] == 3


# ----------------------------------------------------------------------------------- against TRL 1.16
@pytest.fixture(scope="module")
def tiny_model_and_batch(tiny_base):
    """The tiny model (eval mode), its tokenizer and a batch of 4 demo pairs in our layout."""
    from data.formats import load_examples
    from pipeline.config import load_config
    from pipeline.models import load_model, load_tokenizer
    from stages.preferences import encode_pairs

    cfg = load_config("configs/tiny.yaml")
    tok = load_tokenizer(tiny_base, cfg.model, cfg.chat)
    model = load_model(tiny_base, cfg.model, tok).eval()
    pairs, _ = load_examples(cfg.dpo.data, "preference")
    encoded, _ = encode_pairs(tok, pairs[:4], 128)
    batch = dpo_stage.dpo_collate(tok.pad_token_id)([dpo_stage.DPORow(p, i) for i, p in enumerate(encoded)])
    return model, tok, batch


def _trl_mean_logps(model, batch) -> torch.Tensor:
    """TRL's own per-token mean log-probs (``get_batch_logps``, labels -100 outside the response) of our rows."""
    from trl.experimental.cpo import CPOTrainer

    labels = batch["input_ids"].masked_fill(batch["response_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)


def _trl_loss_object(cls, **attributes):
    """A TRL trainer with only the attributes its loss method reads (no model, data or accelerate set-up)."""
    trainer = object.__new__(cls)
    trainer.__dict__.update(accelerator=SimpleNamespace(device=torch.device("cpu")), **attributes)
    return trainer


def test_simpo_equals_trl_cpo_trainer_simpo_loss(tiny_model_and_batch):
    """TRL's ``CPOTrainer.cpo_loss`` with loss_type simpo (cpo_alpha 0: no SFT term, as our default) on TRL's own
    per-token mean log-probs of our rows, against our stage's loss on the same model and batch."""
    from trl.experimental.cpo import CPOTrainer

    model, _, batch = tiny_model_and_batch
    mean = _trl_mean_logps(model, batch)
    ours_mean = dpo_stage.policy_logps(model, batch, mean=True).detach()
    torch.testing.assert_close(ours_mean, mean, rtol=1e-5, atol=1e-5)
    trl = _trl_loss_object(CPOTrainer, beta=2.5, simpo_gamma=0.7, label_smoothing=0.0, loss_type="simpo", alpha=0.0)
    theirs, reward_c, reward_r = trl.cpo_loss(mean[:4], mean[4:])
    with torch.no_grad():
        ours, stats = dpo_stage.make_loss_fn(DPOConfig(loss="simpo", beta=2.5, simpo_gamma=0.7))(model, batch)
    assert float(theirs.mean()) > 0
    torch.testing.assert_close(ours, theirs.mean(), rtol=1e-5, atol=1e-6)
    assert stats["margin"] == pytest.approx(float((reward_c - reward_r).mean()), rel=1e-5)


def test_orpo_odds_ratio_equals_trl_orpo_trainer(tiny_model_and_batch):
    """TRL's ``ORPOTrainer.odds_ratio_loss`` (its λ is ``beta``) on TRL's per-token mean log-probs of our rows.
    ORPO's loss is NLL(chosen) - mean(TRL's odds-ratio losses); our NLL is each chosen response's per-token NLL
    averaged over the pairs (-mean of m_c), where TRL's ``concatenated_forward`` averages over every non-padding
    token of the chosen rows, prompt included (docs/DPO.md): the odds-ratio term is what is compared."""
    from trl.experimental.orpo import ORPOTrainer

    model, _, batch = tiny_model_and_batch
    mean = _trl_mean_logps(model, batch)
    trl = _trl_loss_object(ORPOTrainer, beta=0.25)
    odds_losses, _, _, log_odds_ratio_mean, _ = trl.odds_ratio_loss(mean[:4], mean[4:])
    with torch.no_grad():
        ours, stats = dpo_stage.make_loss_fn(DPOConfig(loss="orpo", orpo_lambda=0.25))(model, batch)
    expected = -mean[:4].mean() - odds_losses.mean()
    assert float(odds_losses.mean()) < 0
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert stats["nll"] == pytest.approx(float(-mean[:4].mean()), rel=1e-5)


def test_kto_equals_trl_kto_trainer_on_identical_tensors(tmp_path, tiny_model_and_batch):
    """TRL 1.16's ``KTOTrainer`` loss (``compute_loss``, reference log-probs given as precomputed) on our KTO
    batch: 4 rows (2 desirable, 2 undesirable) and 4 other sequences as their mismatched (TRL: KL) sequences,
    the reference's log-probs of both invented; the same model computes both losses, and the same z0."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from stages.dpo.kto import make_kto_loss_fn

    model, tok, pairs = tiny_model_and_batch
    own = [0, 5, 2, 7]  # chosen of pair 0, rejected of pair 1, chosen of pair 2, rejected of pair 3
    mismatched = [1, 4, 3, 6]
    take = own + mismatched
    batch = {k: pairs[k][take] for k in ("input_ids", "attention_mask", "response_mask")}
    batch.update(desirable=torch.tensor([True, False, True, False]),
                 ref_chosen=torch.tensor([-40.0, -45.5, -37.0, -43.0]),
                 ref_rejected=torch.tensor([-90.25, -81.0, -71.0, -79.5]))
    dpo = DPOConfig(loss="kto", beta=0.3, desirable_weight=1.3, undesirable_weight=0.8)
    with torch.no_grad():
        ours, stats = make_kto_loss_fn(dpo)(model, batch)

    args = KTOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, desirable_weight=1.3, undesirable_weight=0.8,
                     precompute_ref_log_probs=True, bf16=False, report_to="none", use_cpu=True, disable_tqdm=True,
                     per_device_train_batch_size=2)
    trainer = KTOTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(
        [{"prompt": "Hi", "completion": "Hello there", "label": True},
         {"prompt": "Yo", "completion": "Go away", "label": False}]))
    trainer.model.eval()
    inputs = {"input_ids": batch["input_ids"][:4], "attention_mask": batch["attention_mask"][:4],
              "completion_mask": batch["response_mask"][:4], "label": batch["desirable"],
              "KL_input_ids": batch["input_ids"][4:], "KL_attention_mask": batch["attention_mask"][4:],
              "KL_completion_mask": batch["response_mask"][4:], "ref_logps": batch["ref_chosen"],
              "ref_KL_logps": batch["ref_rejected"]}
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, inputs)
    assert float(theirs) > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert stats["kl"] > 1.0  # a reference point that is not clamped: it moves every row's loss
    assert stats["kl"] == pytest.approx(trainer._metrics["eval"]["kl"][-1], rel=1e-5)
