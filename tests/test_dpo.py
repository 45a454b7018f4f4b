"""DPO stage (stages/dpo/): hand-worked loss values, config validation, learning, the LoRA reference,
resume equivalence, and a two-process DeepSpeed ZeRO-2 run with the distributed checks."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.formats import DataError
from pipeline.config import ConfigError
from stages.dpo import trainer as dpo_stage
from stages.dpo.core import preference_loss, preference_metrics, sequence_logprobs
from tests.helpers.common import marker_preferences, train_rows, write_jsonl

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "helpers" / "dist_engine_driver.py"


def _softplus_neg(x: float) -> float:  # -log σ(x)
    return math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------------------ pure math
# two pairs: h = (logp_c - ref_c) - (logp_r - ref_r) = 1.0 and -2.0
LOGP_C, LOGP_R = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
REF_C, REF_R = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])


def test_sigmoid_loss_hand_worked():
    losses, reward_c, reward_r = preference_loss(LOGP_C, LOGP_R, REF_C, REF_R, beta=0.5, loss_type="sigmoid")
    # -log σ(0.5 * 1) = 0.474077, -log σ(0.5 * -2) = 1.313262
    torch.testing.assert_close(losses, torch.tensor([0.4740770, 1.3132617]))
    torch.testing.assert_close(reward_c, torch.tensor([0.25, -0.5]))  # 0.5 * (logp_c - ref_c)
    torch.testing.assert_close(reward_r, torch.tensor([-0.25, 0.5]))
    stats = preference_metrics(reward_c, reward_r)
    assert float(stats["accuracy"]) == 0.5
    assert float(stats["margin"]) == pytest.approx(-0.25)
    assert float(stats["reward_chosen"]) == pytest.approx(-0.125)
    assert float(stats["reward_rejected"]) == pytest.approx(0.125)


def test_cdpo_loss_hand_worked():
    losses, _, _ = preference_loss(LOGP_C, LOGP_R, REF_C, REF_R, beta=0.5, loss_type="cdpo", label_smoothing=0.1)
    # 0.9 * -log σ(0.5) + 0.1 * -log σ(-0.5) = 0.524077; 0.9 * -log σ(-1) + 0.1 * -log σ(1) = 1.213262
    torch.testing.assert_close(losses, torch.tensor([0.5240770, 1.2132617]))
    assert losses[0] == pytest.approx(0.9 * _softplus_neg(0.5) + 0.1 * _softplus_neg(-0.5))
    # label smoothing 0 is plain DPO
    plain, _, _ = preference_loss(LOGP_C, LOGP_R, REF_C, REF_R, 0.5, "cdpo", 0.0)
    torch.testing.assert_close(plain, preference_loss(LOGP_C, LOGP_R, REF_C, REF_R, 0.5, "sigmoid")[0])


def test_ipo_loss_hand_worked():
    losses, _, _ = preference_loss(LOGP_C, LOGP_R, REF_C, REF_R, beta=0.25, loss_type="ipo")
    # (h - 1 / (2 * 0.25))^2 = (1 - 2)^2 = 1 and (-2 - 2)^2 = 16
    torch.testing.assert_close(losses, torch.tensor([1.0, 16.0]))
    with pytest.raises(ValueError, match="unknown DPO loss"):
        preference_loss(LOGP_C, LOGP_R, REF_C, REF_R, 0.1, "hinge")


def test_loss_gradient_flows_to_the_policy_only():
    logp_c, logp_r = LOGP_C.clone().requires_grad_(), LOGP_R.clone().requires_grad_()
    losses, _, _ = preference_loss(logp_c, logp_r, REF_C, REF_R, 0.5, "sigmoid")
    losses.sum().backward()
    # d/dlogp_c -log σ(β h) = -β σ(-β h): pair 1 -0.5 σ(-0.5) = -0.18754
    assert logp_c.grad[0] == pytest.approx(-0.5 / (1 + math.exp(0.5)), abs=1e-6)
    assert torch.allclose(logp_r.grad, -logp_c.grad)


def test_sequence_logprobs_hand_worked_with_garbage_outside_the_mask():
    # row 0: tokens [2, 0, 1, 2], prompt = the first two tokens, response = tokens 1 and 2 at t = 2, 3
    logits = torch.zeros(2, 4, 3)
    logits[0, 0] = torch.tensor([50.0, -50.0, 7.0])       # predicts the prompt token: not counted
    logits[0, 1] = torch.tensor([0.0, math.log(2.0), 0.0])  # p(token 1) = 2/4
    logits[0, 2] = torch.zeros(3)                           # p(token 2) = 1/3
    logits[0, 3] = torch.full((3,), 1e4)                    # the last position predicts nothing
    ids = torch.tensor([[2, 0, 1, 2], [1, 1, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]])       # row 1: one response token, then padding
    logits[1] = torch.randn(4, 3) * 100
    logits[1, 0] = torch.tensor([0.0, 0.0, 0.0])
    total, count = sequence_logprobs(logits, ids, mask)
    assert total[0] == pytest.approx(math.log(0.5) + math.log(1 / 3), abs=1e-6)
    assert total[1] == pytest.approx(math.log(1 / 3), abs=1e-6)
    assert count.tolist() == [2.0, 1.0]
    assert total.dtype == torch.float32


# ------------------------------------------------------------------------------------------- config
def test_dpo_without_preference_data_fails_at_validate(tiny_cfg):
    with pytest.raises(ConfigError, match=r"dpo\.data is not set"):
        tiny_cfg("stages=[dpo]", "dpo.init_from=base", "dpo.data=null")
    with pytest.raises(ConfigError, match=r"dpo\.init_from is 'sft'"):
        tiny_cfg("stages=[dpo]")
    with pytest.raises(ConfigError, match=r"dpo\.loss='cdpo' needs dpo\.label_smoothing"):
        tiny_cfg("dpo.loss=cdpo")
    with pytest.raises(ConfigError, match=r"only used by dpo\.loss='cdpo'"):
        tiny_cfg("dpo.label_smoothing=0.1")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(REPO / "configs" / "tiny.yaml"),
                           "stages=[dpo]", "dpo.init_from=base", "dpo.data=null"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0 and "dpo.data is not set" in proc.stdout + proc.stderr


def test_stage_is_registered_with_its_parents(tiny_cfg):
    from pipeline import memory
    from pipeline.plan import select_stages
    from pipeline.registry import parents_of, stage_names

    cfg = tiny_cfg("stages=[sft]")
    assert "dpo" in stage_names(cfg)
    assert select_stages(cfg, ["sft", "dpo"]) == ["sft", "dpo"]
    assert parents_of(cfg, "dpo") == ["sft"]
    assert parents_of(tiny_cfg("stages=[sft, rlaif_label, dpo]"), "dpo") == ["sft", "rlaif_label"]
    assert parents_of(tiny_cfg("stages=[dpo]", "dpo.init_from=base"), "dpo") == []
    full = memory.estimate(cfg, "dpo")
    roles = {r.role: r for r in full.roles}
    assert roles["policy"].grads > 0 and roles["reference"].weights == 0
    lora = memory.estimate(tiny_cfg("dpo.tuning.method=lora"), "dpo")
    assert sum(r.weights for r in lora.roles) <= sum(r.weights for r in full.roles)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Hi", "chosen": "Hello"}, r"missing column\(s\) 'rejected'"),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "Hi", "responses": ["a", "b"], "ranking": [0, 0]}, "'ranking' must be a permutation"),
])
def test_bad_preference_records_name_file_and_line(tmp_path, tiny_cfg, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away."}, record])
    cfg = tiny_cfg(f"dpo.data.path={path}", "dpo.init_from=base", "stages=[dpo]")
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: {message}"):
        dpo_stage.run(cfg)
    manifest = json.loads((cfg.stage_dir("dpo") / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "bad.jsonl:2" in manifest["error"]


# ------------------------------------------------------------------------------------------ training
def test_dpo_raises_heldout_preference_accuracy_and_margin(tmp_path, tiny_cfg):
    from pipeline.models import resolve_checkpoint

    path = write_jsonl(tmp_path / "marker.jsonl", marker_preferences(120))
    cfg = tiny_cfg(f"dpo.data.path={path}", "dpo.init_from=base", "stages=[dpo]", "dpo.eval_fraction=0.2",
                   "dpo.train.max_steps=30", "dpo.train.learning_rate=2e-3", "dpo.train.eval_steps=10")
    metrics = dpo_stage.run(cfg)
    # the implicit reward ranks held-out pairs (0 accuracy, 0 margin at step 0, where policy = reference)
    assert metrics["eval_accuracy"] >= 0.8 and metrics["eval_margin"] > 0.2, metrics
    # and the policy itself moved towards the chosen responses on prompts it never saw
    assert metrics["eval_logp_margin"] > metrics["reference_eval_logp_margin"] + 1.0, metrics
    assert metrics["eval_logp_accuracy"] > metrics["reference_eval_logp_accuracy"], metrics
    out = cfg.stage_dir("dpo")
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in log if "loss" in r]
    assert len(train_rows) == 30
    for key in ("reward_chosen", "reward_rejected", "margin", "accuracy"):
        assert key in train_rows[0]
    evals = [r for r in log if "eval_accuracy" in r]
    assert [r["step"] for r in evals][:3] == [10, 20, 30]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["chat_fingerprint"]
    assert manifest["dpo_loss"] == {"loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0}
    assert manifest["preference_data"]["from"] == "dpo.data"
    assert not (out / "checkpoints").exists()
    # an HF policy checkpoint the server and later stages load
    model_dir, tok_dir = resolve_checkpoint(out)
    assert (model_dir / "model.safetensors").exists() and (out / "chat_template.jinja").exists()


def test_lora_reference_is_the_adapter_disabled_model(tiny_cfg):
    from pipeline.models import load_model, load_tokenizer, prepare_base
    from stages.preferences import encode_pairs
    from stages.tuning import apply_tuning

    cfg = tiny_cfg("dpo.tuning.method=lora")
    base = prepare_base(cfg.model)
    tok = load_tokenizer(base, cfg.model, cfg.chat)
    from data.formats import load_examples

    pairs, _ = load_examples(cfg.dpo.data, "preference")
    encoded, _ = encode_pairs(tok, pairs[:6], 128)
    collate = dpo_stage.dpo_collate(tok.pad_token_id)
    device = torch.device("cpu")

    def reference_of(model):
        rows = [dpo_stage.DPORow(p) for p in encoded]
        dpo_stage.compute_reference(model, rows, collate, 4, device, False, False)
        return torch.tensor([[r.ref_chosen, r.ref_rejected] for r in rows])

    plain = load_model(base, cfg.model, tok)
    expected = reference_of(plain)
    peft_model, _ = apply_tuning(load_model(base, cfg.model, tok), cfg.dpo.tuning, "causal_lm", 10)
    with torch.no_grad():  # a trained adapter: lora_B is no longer zero
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    torch.testing.assert_close(reference_of(peft_model), expected, atol=1e-5, rtol=0)
    rows = [dpo_stage.DPORow(p) for p in encoded]
    batch = collate(rows)
    with torch.no_grad():
        adapted = dpo_stage.policy_logps(peft_model.eval(), batch, mean=False)
    assert (adapted - torch.cat([expected[:, 0], expected[:, 1]])).abs().max() > 1e-2


def test_lora_dpo_from_the_sft_stage(tiny_cfg):
    from stages import sft

    cfg = tiny_cfg("stages=[sft, dpo]", "sft.train.max_steps=4", "dpo.train.max_steps=4",
                   "dpo.tuning.method=lora", "dpo.loss=ipo", "dpo.beta=0.5")
    sft.run(cfg)
    metrics = dpo_stage.run(cfg)
    out = cfg.stage_dir("dpo")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["parents"].keys() == {"sft"}
    assert "adapter disabled" in manifest["reference"]
    assert manifest["policy_source"].startswith("sft stage")
    assert (out / "adapter").exists() and (out / "model" / "config.json").exists()
    assert metrics["steps"] == 4 and math.isfinite(metrics["eval_loss"])


@pytest.mark.parametrize("method, loss", [("full", "sigmoid"), ("lora", "sigmoid"), ("lora", "kto"), ("full", "orpo")])
def test_interrupted_stage_resumes_to_the_same_weights(tiny_cfg, monkeypatch, method, loss):
    """Killed after the step-4 checkpoint and resumed, the run ends with the very weights and logged rows of an
    uninterrupted one. With LoRA the reference log-probs are computed per micro-batch: the checkpoint carries
    the cache, so the resumed run computes only the pairs (KTO: rows, with their mismatched sequences) first met
    after step 4. ORPO has no reference and no cache."""
    from safetensors.torch import load_file

    from stages.engine import Engine

    caches = []
    real_init = dpo_stage.ReferenceCache.__init__

    def remember(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(dpo_stage.ReferenceCache, "__init__", remember)
    common = ["stages=[dpo]", "dpo.init_from=base", "dpo.train.max_steps=8", "dpo.train.save_steps=4",
              "dpo.train.per_device_batch_size=4", f"dpo.tuning.method={method}", f"dpo.loss={loss}",
              *(["dpo.beta=null"] if loss == "orpo" else [])]
    straight = tiny_cfg("run_name=straight", *common)
    dpo_stage.run(straight)

    cfg = tiny_cfg("run_name=killed", *common)
    original = Engine.save_checkpoint

    def save_then_die(self):
        original(self)
        raise KeyboardInterrupt("simulated kill after the first checkpoint")

    monkeypatch.setattr(Engine, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        dpo_stage.run(cfg)
    assert (cfg.stage_dir("dpo") / "checkpoints" / "latest").read_text() == "step-4"
    stage_state = cfg.stage_dir("dpo") / "checkpoints" / "step-4" / "stage-rank0.safetensors"
    assert stage_state.exists() == (loss != "orpo")  # the reference cache, when there is a reference
    monkeypatch.setattr(Engine, "save_checkpoint", original)
    dpo_stage.run(cfg)
    manifest = json.loads((cfg.stage_dir("dpo") / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed"] is True
    a = load_file(straight.stage_dir("dpo") / "model" / "model.safetensors")
    b = load_file(cfg.stage_dir("dpo") / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows, rows_straight = train_rows(cfg.stage_dir("dpo"), "loss"), train_rows(straight.stage_dir("dpo"), "loss")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_straight]
    if loss == "orpo":
        assert caches == []
        return
    whole, killed, resumed = caches
    assert resumed.computed == whole.computed
    if method == "lora":  # lazy: the resumed run computes only what the checkpoint's cache lacks
        assert 0 < killed.forward_pairs < whole.forward_pairs
        assert resumed.forward_pairs == whole.forward_pairs - killed.forward_pairs


# ------------------------------------------------------------------------------- reference and dropout
@pytest.mark.parametrize("method", ["lora", "full"])
def test_reference_logprobs_only_for_the_pairs_the_steps_use(tmp_path, tiny_cfg, monkeypatch, method):
    """5 steps of 4 pairs out of 96 compute the reference for exactly the 20 pairs they train on, each once;
    out of 12 pairs (steps 4-5 in the second epoch) for the 12, not 20. With LoRA each micro-batch's pairs
    are computed just before it trains (lazily); full fine-tuning computes them all before step 1."""
    forwards: list[tuple[int, int]] = []  # (pairs in a reference forward, loss calls before it)
    trained: list[list[int]] = []
    real_reference, real_loss = dpo_stage.compute_reference, dpo_stage.make_loss_fn

    def counting_reference(model, rows, *args, **kwargs):
        if rows:  # the held-out pairs: none here
            forwards.append((len(rows), len(trained)))
        return real_reference(model, rows, *args, **kwargs)

    def recording_loss(*args, **kwargs):
        loss_fn = real_loss(*args, **kwargs)

        def recorded(model, batch):
            trained.append(batch["pair_index"].tolist())
            return loss_fn(model, batch)

        return recorded

    monkeypatch.setattr(dpo_stage, "compute_reference", counting_reference)
    monkeypatch.setattr(dpo_stage, "make_loss_fn", recording_loss)
    for n_pairs, distinct in ((96, 20), (12, 12)):
        forwards.clear()
        trained.clear()
        data = write_jsonl(tmp_path / f"pairs{n_pairs}.jsonl", marker_preferences(n_pairs))
        cfg = tiny_cfg(f"run_name=p{n_pairs}", "stages=[dpo]", f"dpo.data.path={data}", "dpo.init_from=base",
                       "dpo.eval_fraction=0", "dpo.train.max_steps=5", "dpo.train.per_device_batch_size=4",
                       f"dpo.tuning.method={method}")
        metrics = dpo_stage.run(cfg)
        used = {i for batch in trained for i in batch}
        assert len(trained) == 5 and len(used) == distinct
        assert sum(n for n, _ in forwards) == distinct, forwards  # each pair once, nothing else
        assert metrics["reference_train_pairs"] == distinct and metrics["train_pairs"] == n_pairs
        if method == "lora":  # one forward per micro-batch with new pairs, just before it trains
            assert [before for _, before in forwards] == list(range(len(forwards)))
        else:
            assert all(before == 0 for _, before in forwards)
    assert [n for n, _ in forwards] == [4, 4, 4]  # 12 pairs: the second epoch's steps reuse the cache


@pytest.mark.parametrize("tuning", [
    ["dpo.tuning.method=full", "dpo.train.gradient_checkpointing=true"],
    ["dpo.tuning.method=lora", "dpo.tuning.lora_dropout=0.3"],
], ids=["full-checkpointing", "lora"])
def test_step_zero_is_log2_and_zero_margin_in_a_model_built_with_dropout(tiny_cfg, tiny_dropout_base, tuning):
    """The policy at step 0 is the reference, so the first row's loss is -log σ(0) = log 2 and its margin 0,
    even for a model built with attention_dropout=0.5 (and LoRA dropout): dpo.disable_dropout (default) turns
    it off where the attention modules copied it. Negative control: with dropout on, the loss is not log 2."""
    common = [*tiny_dropout_base(0.5), "stages=[dpo]", "dpo.init_from=base", "dpo.eval_fraction=0",
              "dpo.train.max_steps=1", *tuning]
    off = tiny_cfg("run_name=dropout-off", *common)
    dpo_stage.run(off)
    first = train_rows(off.stage_dir("dpo"), "loss")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6 and abs(first["margin"]) < 1e-6, first
    assert first["accuracy"] == 0.0  # no pair has reward_chosen strictly above reward_rejected
    on = tiny_cfg("run_name=dropout-on", *common, "dpo.disable_dropout=false")
    dpo_stage.run(on)
    assert abs(train_rows(on.stage_dir("dpo"), "loss")[0]["loss"] - math.log(2)) > 1e-3


def test_logged_lr_is_the_rate_each_step_used(tiny_cfg):
    """Cosine over 3 steps without warm-up, lr 1e-3: the steps use lr x 0.5 (1 + cos(pi k / 3)), k = 0, 1, 2 =
    1e-3, 7.5e-4, 2.5e-4 (the last step's rate is not 0: the schedule reaches 0 only after it). With 2 of 4
    steps of warm-up: (k + 1) / 2 during it, then cosine from 1: 5e-4, 1e-3, 1e-3, 5e-4."""
    common = ["stages=[dpo]", "dpo.init_from=base", "dpo.eval_fraction=0", "dpo.train.learning_rate=1e-3",
              "dpo.train.lr_scheduler=cosine", "dpo.train.per_device_batch_size=4"]
    plain = tiny_cfg("run_name=plain", *common, "dpo.train.max_steps=3", "dpo.train.warmup_ratio=0")
    dpo_stage.run(plain)
    assert [r["lr"] for r in train_rows(plain.stage_dir("dpo"), "loss")] == pytest.approx([1e-3, 7.5e-4, 2.5e-4])
    warm = tiny_cfg("run_name=warm", *common, "dpo.train.max_steps=4", "dpo.train.warmup_ratio=0.5")
    dpo_stage.run(warm)
    assert [r["lr"] for r in train_rows(warm.stage_dir("dpo"), "loss")] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])


# ------------------------------------------------------------------------------------ against TRL
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_equals_trl_dpo_trainer_on_identical_tensors(tmp_path, tiny_cfg, loss_type):
    """Our batch (chosen rows then rejected rows, response mask) and reference numbers through TRL 1.16's
    ``DPOTrainer.compute_loss`` and through our loss, same model. TRL is given summed reference log-probs
    (and divides the log-ratios by the completion length for IPO); ours is given them in its own form
    (per-token means for IPO)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from data.formats import load_examples
    from pipeline.models import load_model, load_tokenizer, prepare_base
    from stages.dpo.config import DPOConfig as DPOConfig_
    from stages.preferences import encode_pairs

    cfg = tiny_cfg()
    base = prepare_base(cfg.model)
    tok = load_tokenizer(base, cfg.model, cfg.chat)
    model = load_model(base, cfg.model, tok).eval()
    pairs, _ = load_examples(cfg.dpo.data, "preference")
    encoded, _ = encode_pairs(tok, pairs[:4], 128)
    ref_sums = torch.tensor([[-40.0, -45.5], [-37.0, -43.0], [-60.25, -41.0], [-31.0, -39.5]])
    batch = dpo_stage.dpo_collate(tok.pad_token_id)([dpo_stage.DPORow(p, i) for i, p in enumerate(encoded)])
    count = batch["response_mask"][:, 1:].sum(1).float()
    ref_c, ref_r = ref_sums[:, 0], ref_sums[:, 1]
    if loss_type == "ipo":
        ref_c, ref_r = ref_c / count[:4], ref_r / count[4:]
    ours, _ = dpo_stage.make_loss_fn(DPOConfig_(loss=loss_type, beta=0.3))(model, dict(batch, ref_chosen=ref_c,
                                                                                   ref_rejected=ref_r))

    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, loss_type=[loss_type], precompute_ref_log_probs=True,
                     bf16=False, gradient_checkpointing=False, report_to="none", use_cpu=True, disable_tqdm=True,
                     per_device_train_batch_size=2)
    trainer = DPOTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(
        [{"prompt": "Hi", "chosen": "Hello there", "rejected": "Go away"}] * 2))
    trainer.model.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": batch["response_mask"], "ref_chosen_logps": ref_sums[:, 0],
              "ref_rejected_logps": ref_sums[:, 1]}
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, inputs)
    assert float(theirs) > 0
    torch.testing.assert_close(ours.detach(), theirs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- distributed
def _torchrun(out: Path, overrides: list[str], unsync: bool = False) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with socket.socket() as sock:  # torchrun's --master_port 0 hangs with static rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(DRIVER), str(REPO / "configs" / "tiny.yaml"), str(out), "--stage=dpo", *overrides]
    if unsync:
        cmd.append("--unsync")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_zero2_dpo_matches_one_process(tmp_path, tiny_cfg):
    """Every rank is a world-size-2 DeepSpeed engine, ranks see different pairs, parameters are identical
    across ranks and equal a 1-process run on the same global batch; an unsynchronised run fails the same
    check (negative control). A pair's loss is a mean over pairs, so 2 x micro 4 averages to 1 x micro 8."""
    data = write_jsonl(tmp_path / "marker.jsonl", marker_preferences(32))
    common = ["stages=[dpo]", f"dpo.data.path={data}", "dpo.init_from=base", "dpo.eval_fraction=0",
              "dpo.train.max_steps=3", "dpo.train.warmup_ratio=0", "dpo.train.learning_rate=1e-3",
              "dpo.train.save_steps=100", "logging.progress_bar=false"]
    ds_out = tmp_path / "ds"
    _torchrun(ds_out, common + [f"output_root={tmp_path / 'o-ds'}", "dpo.train.per_device_batch_size=4",
                                "dpo.train.deepspeed=configs/deepspeed/zero2.json"])
    ranks = [json.loads((ds_out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for info in ranks:
        assert info["world_size"] == 2 and info["engine"] == "DeepSpeedEngine" and info["zero_stage"] == 2
        assert info["steps"] == 3
    seen0, seen1 = set(ranks[0]["indices"][0]), set(ranks[1]["indices"][0])
    assert seen0 and seen1 and seen0 != seen1, "ranks must see different data"
    p0, p1 = torch.load(ds_out / "rank0.pt"), torch.load(ds_out / "rank1.pt")
    assert _max_param_diff(p0, p1) == 0.0, "parameters differ across ranks"

    single = tiny_cfg(*[c for c in common if not c.startswith("logging")], "run_name=single",
                      "dpo.train.per_device_batch_size=8")
    dpo_stage.run(single)
    from safetensors.torch import load_file

    ref = load_file(single.stage_dir("dpo") / "model" / "model.safetensors")
    assert _max_param_diff({k: p0[k] for k in ref}, {k: v.float() for k, v in ref.items()}) < 1e-5
    saved = load_file(tmp_path / "o-ds" / "tiny" / "dpo" / "model" / "model.safetensors")
    assert _max_param_diff({k: p0[k] for k in saved}, {k: v.float() for k, v in saved.items()}) < 1e-6

    bad_out = tmp_path / "unsync"
    _torchrun(bad_out, common + [f"output_root={tmp_path / 'o-bad'}", "dpo.train.per_device_batch_size=4"],
              unsync=True)
    b0, b1 = torch.load(bad_out / "rank0.pt"), torch.load(bad_out / "rank1.pt")
    assert _max_param_diff(b0, b1) > 1e-4, "negative control: unsynchronised ranks should diverge"
