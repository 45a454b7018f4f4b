"""Reward-model stage (stages/rm.py): layout, truncation, K-wise batching, bad data, training, outputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from data.formats import DataError, PreferencePair
from pipeline.manifest import ManifestError
from stages import rm as rm_stage
from stages.chat import encode_sequence, last_token_index
from stages.engine import group_batches
from stages.rm import encode_pair, encode_pairs, load_preferences, margin_buckets, pairwise_loss
from stages.scoring import (
    REWARD_LAYOUT,
    find_score_head,
    load_reward_model,
    score_at_eos,
    score_responses,
    score_sequences,
    score_token_ids,
    token_scores,
)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORDS = ["apple", "river", "garden", "window", "planet", "silver", "pencil", "rocket", "forest", "candle",
         "bridge", "letter", "castle", "dragon", "mirror", "orange", "pepper", "summer", "winter", "yellow"]


def msgs(role: str, text: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_parts():
    """(tokenizer, seq-cls model) of the tiny base model."""
    from pipeline.config import load_config
    from pipeline.models import load_model, load_tokenizer, prepare_base

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    base = prepare_base(cfg.model)
    tok = load_tokenizer(base, cfg.model, cfg.chat)
    torch.manual_seed(0)
    model = load_model(base, cfg.model, tok, kind="seq_cls")
    model.eval()
    return tok, model


# ------------------------------------------------------------------------------------- pure pieces
def test_score_at_eos_pure():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0],
                           [9.0, 8.0, 7.0, 6.0, 5.0],
                           [0.0, 1.5, 2.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0],    # right padding
                         [0, 0, 1, 1, 1],    # left padding
                         [0, 1, 1, 0, 0]])   # both sides
    assert last_token_index(mask).tolist() == [2, 4, 2]
    assert score_at_eos(scores, mask).tolist() == [3.0, 5.0, 2.5]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[0, 0, 0]]))


def test_pairwise_loss_hand_worked():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    loss, m = pairwise_loss(rc, rr)
    logsigmoid = torch.nn.functional.logsigmoid
    expected = (-logsigmoid(torch.tensor(1.0)) - logsigmoid(torch.tensor(-1.0))) / 2
    assert torch.isclose(loss, expected)
    assert m["accuracy"] == 0.5 and m["margin"] == 0.0
    # margin shifts the difference; centring adds c * mean((rc + rr)^2) = 0.1 * (9 + 1) / 2
    loss_m, _ = pairwise_loss(rc, rr, torch.tensor([1.0, 0.0]), center_coef=0.1)
    expected_m = (-logsigmoid(torch.tensor(0.0)) - logsigmoid(torch.tensor(-1.0))) / 2 + 0.5
    assert torch.isclose(loss_m, expected_m)
    assert loss.dtype == torch.float32


def test_margin_buckets():
    rc = torch.tensor([0.1, 0.0, 3.0, -2.0])
    rr = torch.tensor([0.0, 0.2, 0.0, 2.0])
    buckets = margin_buckets(rc, rr, n_buckets=2)
    assert [b["count"] for b in buckets] == [2, 2]
    assert buckets[0]["accuracy"] == 0.5 and buckets[1]["accuracy"] == 0.5
    assert buckets[0]["hi"] <= buckets[1]["lo"]


# ------------------------------------------------------------------------------------------ layout
def test_sequence_ends_at_eos_and_strips_template_tail(tiny_parts):
    tok, _ = tiny_parts
    enc = encode_sequence(tok, msgs("user", "What is 2 plus 2?"), msgs("assistant", "2 plus 2 is 4."))
    rendered = tok.apply_chat_template(msgs("user", "What is 2 plus 2?") + msgs("assistant", "2 plus 2 is 4."),
                                       tokenize=False)
    assert rendered.endswith(tok.eos_token + "\n")  # the template's tail, which the layout strips
    assert enc.ids[-1] == tok.eos_token_id and tok.decode(enc.ids) == rendered[:-1]
    assert tok.pad_token_id != tok.eos_token_id
    prompt_text = tok.decode(enc.ids[: enc.prompt_tokens])
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert tok.decode(enc.ids[enc.prompt_tokens - enc.header_tokens: enc.prompt_tokens]) == "<|im_start|>assistant\n"


def test_score_index_is_eos_with_left_and_right_context(tiny_parts):
    tok, model = tiny_parts
    pad = tok.pad_token_id
    a = encode_sequence(tok, msgs("user", "Reverse the word 'apple'."),
                        msgs("assistant", "The reversed word is 'elppa'.")).ids
    b = encode_sequence(tok, msgs("user", "What is 6 times 7?"), msgs("assistant", "42")).ids
    width = max(len(a), len(b)) + 3
    # row 0: two pads before (left context), pads after; row 1: right padding only
    row0 = [pad, pad] + a + [pad] * (width - len(a) - 2)
    row1 = b + [pad] * (width - len(b))
    ids = torch.tensor([row0, row1])
    mask = torch.tensor([[0, 0] + [1] * len(a) + [0] * (width - len(a) - 2),
                         [1] * len(b) + [0] * (width - len(b))])
    index = last_token_index(mask)
    assert index.tolist() == [1 + len(a), len(b) - 1]
    assert ids[0, index[0]] == tok.eos_token_id and ids[1, index[1]] == tok.eos_token_id
    assert ids[0, index[0] + 1] == pad and ids[0, index[0] - 1] != pad  # a pad after, tokens before
    with torch.no_grad():
        scores = score_sequences(model, ids, mask)
        # by hand: run the backbone on the unpadded sequence, apply the head at the eos (last) position
        for i, seq in enumerate((a, b)):
            hidden = model.model(input_ids=torch.tensor([seq])).last_hidden_state
            by_hand = model.score(hidden[0, -1]).squeeze()
            assert torch.allclose(scores[i], by_hand, atol=1e-5), (i, scores[i], by_hand)
        # the helper PPO uses agrees (it right-pads)
        assert torch.allclose(score_token_ids(model, [a, b], pad), scores, atol=1e-5)
    assert find_score_head(model) is model.score


@pytest.mark.gpu
def test_head_runs_in_fp32_under_bf16_autocast(tiny_parts):
    tok, model = tiny_parts
    ids = torch.tensor([encode_sequence(tok, msgs("user", "What is 6 times 7?"), msgs("assistant", "42")).ids])
    mask = torch.ones_like(ids)
    captured = {}
    def keep_hidden(module, args, output):
        captured["hidden"] = output.last_hidden_state

    hook = model.model.register_forward_hook(keep_hidden)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = token_scores(model, ids, mask)
    finally:
        hook.remove()
    assert scores.dtype == torch.float32
    expected = (captured["hidden"].float() @ model.score.weight.float().T)[..., 0]
    assert torch.allclose(scores, expected, atol=1e-6)
    scores[0, -1].backward()  # gradients flow through the captured head output
    assert model.score.weight.grad is not None and float(model.score.weight.grad.abs().sum()) > 0
    model.zero_grad(set_to_none=True)


def test_truncation_and_skip_counts(tiny_parts):
    tok, _ = tiny_parts
    long_prompt = " ".join(WORDS * 3)
    short = PreferencePair(msgs("user", "What is 1 plus 1?"), msgs("assistant", "2"), msgs("assistant", "3"),
                           None, 0, "f:1")
    cut = PreferencePair(msgs("user", long_prompt), msgs("assistant", "apple river"), msgs("assistant", "no"),
                         1.5, 1, "f:2")
    too_long = PreferencePair(msgs("user", "Say it."), msgs("assistant", long_prompt), msgs("assistant", "no"),
                              None, 2, "f:3")
    max_length = 40
    rows, report = encode_pairs(tok, [short, cut, too_long], max_length)
    assert (report.pairs, report.kept, report.prompt_truncated, report.skipped_too_long) == (3, 2, 1, 1)
    assert report.first_skipped == "f:3"
    assert encode_pair(tok, too_long, max_length) is None
    full_c = encode_sequence(tok, cut.prompt, cut.chosen)
    full_r = encode_sequence(tok, cut.prompt, cut.rejected)
    row = rows[1]
    assert max(len(row.chosen), len(row.rejected)) == max_length
    assert row.truncated == max(len(full_c.ids), len(full_r.ids)) - max_length and row.margin == 1.5
    # the response (with its header) is kept whole, the prompt lost tokens from the left only
    keep_c = len(full_c.ids) - full_c.prompt_tokens + full_c.header_tokens
    assert row.chosen[-keep_c:] == full_c.ids[-keep_c:] and row.chosen[-1] == tok.eos_token_id
    assert row.chosen == full_c.ids[row.truncated:]
    assert row.rejected == full_r.ids[row.truncated:]  # same cut for both: same context
    assert rows[0].chosen == encode_sequence(tok, short.prompt, short.chosen).ids and rows[0].truncated == 0


# ------------------------------------------------------------------------------------------- data
def test_kwise_expansion_pairs_and_one_batch(tmp_path, tiny_cfg):
    path = write_jsonl(tmp_path / "rank.jsonl", [
        {"prompt": "Name a fruit.", "responses": ["banana", "carrot", "apple"], "ranking": [2, 0, 1]},
        {"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "5"},
    ])
    cfg = tiny_cfg(f"rm.data.path={path}", "rm.eval_fraction=0")
    train, held, _ = load_preferences(cfg)
    assert held == []
    got = [(p.chosen[0]["content"], p.rejected[0]["content"], p.group) for p in train]
    assert got == [("apple", "banana", 0), ("apple", "carrot", 0), ("banana", "carrot", 0), ("4", "5", 1)]
    # the demo rankings: 60 prompts x 4 responses -> 6 pairs each, every group in one micro-batch
    cfg = tiny_cfg("rm.data.path=data/demo/rankings.jsonl", "rm.eval_fraction=0.1")
    train, held, _ = load_preferences(cfg)
    assert len(train) + len(held) == 60 * 6
    assert not {p.group for p in train} & {p.group for p in held}  # split by prompt
    groups = [p.group for p in train]
    for batch in group_batches(groups, epoch=0, seed=0, rank=0, world=1, micro=8):
        in_batch = [groups[i] for i in batch]
        assert all(in_batch.count(g) == groups.count(g) == 6 for g in in_batch)


def test_kwise_groups_reach_the_engine_in_one_batch(tmp_path, tiny_cfg, monkeypatch):
    seen: list[list[int]] = []
    real = rm_stage.pair_collate

    def spy(pad_id):
        collate = real(pad_id)

        def wrapped(rows):
            seen.append([r.group for r in rows])
            return collate(rows)

        return wrapped

    monkeypatch.setattr(rm_stage, "pair_collate", spy)
    cfg = tiny_cfg("rm.data.path=data/demo/rankings.jsonl", "rm.eval_fraction=0", "rm.init_from=base",
                   "rm.train.max_steps=3")
    metrics = rm_stage.run(cfg)
    assert metrics["kwise_groups"] == 60 and metrics["train_pairs"] == 360
    assert len(seen) == 3
    for batch in seen:
        assert all(batch.count(g) == 6 for g in batch)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Hi", "chosen": "Hello"}, r"missing column\(s\) 'rejected'"),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "Hi", "chosen": "", "rejected": "Hello"}, "'chosen' is an empty string"),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": "   "}, "'rejected' is an empty string"),
    ({"prompt": "", "chosen": "Hello", "rejected": "Bye"}, "empty prompt"),
    ({"prompt": "Hi", "responses": ["a", "b"], "ranking": [0, 0]}, "'ranking' must be a permutation"),
])
def test_bad_preference_records_name_file_and_line(tmp_path, tiny_cfg, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away."}, record])
    cfg = tiny_cfg(f"rm.data.path={path}")
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: {message}"):
        load_preferences(cfg)


def test_missing_sft_parent_names_the_command(tiny_cfg):
    cfg = tiny_cfg("rm.init_from=sft")
    with pytest.raises(ManifestError) as info:
        rm_stage.run(cfg)
    assert "make sft" in str(info.value) and "--stages sft" in str(info.value)


# --------------------------------------------------------------------------------------- training
def marker_preferences(n: int, seed: int = 0) -> list[dict]:
    """chosen ends with the marker word 'thanks'; rejected is a different sentence without it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = f"Tell me about the {rng.choice(WORDS)}."
        chosen = " ".join(rng.sample(WORDS, 3)) + " thanks"
        rejected = " ".join(rng.sample(WORDS, 4))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def test_learnable_preference_reaches_high_heldout_accuracy(tmp_path, tiny_cfg):
    rows = marker_preferences(160)
    # two pairs whose prompt is cut from the left, one whose response cannot fit (counted, not dropped)
    long_prompt = " ".join(WORDS * 4)
    rows += [{"prompt": long_prompt, "chosen": "apple river thanks", "rejected": "apple river"},
             {"prompt": long_prompt + " again", "chosen": "forest thanks", "rejected": "forest"},
             {"prompt": "Say it.", "chosen": long_prompt + " thanks", "rejected": "no"}]
    path = write_jsonl(tmp_path / "marker.jsonl", rows)
    cfg = tiny_cfg(f"rm.data.path={path}", "rm.init_from=base", "rm.eval_fraction=0.2", "rm.max_length=64",
                   "rm.train.max_steps=40", "rm.train.learning_rate=3e-3", "rm.center_rewards_coefficient=0.01")
    metrics = rm_stage.run(cfg)
    assert metrics["eval_accuracy"] >= 0.9, metrics
    assert metrics["eval_mean_margin"] > 0
    assert metrics["prompt_truncated"] == 2 and metrics["skipped_too_long"] == 1
    assert metrics["train_pairs"] + metrics["eval_pairs"] == len(rows) - 1
    buckets = metrics["accuracy_by_margin_bucket"]
    assert sum(b["count"] for b in buckets) == metrics["eval_pairs"]

    out = cfg.stage_dir("rm")
    png = out / "score_histogram.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["reward_layout"] == REWARD_LAYOUT
    assert manifest["chat_format"]["reward_read_position"] == "last_token_of_response_eos"
    for key in ("eval_accuracy", "eval_mean_margin", "accuracy_by_margin_bucket", "skipped_too_long",
                "prompt_truncated", "score_histogram"):
        assert key in manifest["metrics"]
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in log if "loss" in r]
    assert len(train_rows) == 40 and all("accuracy" in r for r in train_rows)
    assert (out / "model" / "config.json").exists() and not (out / "checkpoints").exists()

    # the saved model scores the same layout: chosen above rejected on fresh pairs
    model, tok = load_reward_model(out, cfg.model)
    fresh = marker_preferences(20, seed=99)
    chosen = score_responses(model, tok, [r["prompt"] for r in fresh], [r["chosen"] for r in fresh])
    rejected = score_responses(model, tok, [r["prompt"] for r in fresh], [r["rejected"] for r in fresh])
    assert float((chosen > rejected).float().mean()) >= 0.9


def test_lora_reward_model_from_sft_parent(tmp_path, tiny_cfg):
    from stages.sft import run as run_sft

    run_sft(tiny_cfg("sft.train.max_steps=2", "sft.eval_fraction=0"))
    path = write_jsonl(tmp_path / "marker.jsonl", marker_preferences(40))
    cfg = tiny_cfg(f"rm.data.path={path}", "rm.init_from=sft", "rm.train.max_steps=3", "rm.tuning.method=lora")
    metrics = rm_stage.run(cfg)
    out = cfg.stage_dir("rm")
    manifest = json.loads((out / "manifest.json").read_text())
    sft_manifest = json.loads((cfg.stage_dir("sft") / "manifest.json").read_text())
    assert manifest["chat_fingerprint"] == sft_manifest["chat_fingerprint"]
    assert manifest["model_format"] == "merged" and (out / "adapter").exists() and (out / "model").exists()
    assert metrics["steps"] == 3
    # the merged model/ gives the scores the held-out eval measured
    model, tok = load_reward_model(out, cfg.model)
    train, held, _ = load_preferences(cfg)
    rows, _ = encode_pairs(tok, held, cfg.rm.max_length)
    batch = rm_stage.pair_collate(tok.pad_token_id)(rows)
    with torch.no_grad():
        scores = score_sequences(model, batch["input_ids"], batch["attention_mask"])
    n = len(rows)
    acc = float((scores[:n] > scores[n:]).float().mean())
    assert acc == pytest.approx(metrics["eval_accuracy"])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_process_deepspeed_rm(tmp_path, zero):
    """The stage entry point under torchrun with 2 ranks and DeepSpeed ZeRO-2/3 (gloo on CPU): a world-size-2
    run completes, the gathered model/ loads, and its scores reproduce the held-out accuracy it logged."""
    import os
    import socket
    import subprocess
    import sys

    from pipeline.config import load_config

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = write_jsonl(tmp_path / "marker.jsonl", marker_preferences(48))
    overrides = [f"output_root={tmp_path / 'out'}", "logging.progress_bar=false", f"rm.data.path={path}",
                 "rm.init_from=base", "rm.eval_fraction=0.25", "rm.train.max_steps=4", "rm.train.save_steps=2",
                 "rm.train.per_device_batch_size=4", f"rm.train.deepspeed=configs/deepspeed/{zero}.json"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "stages", "rm", "--config", str(REPO / "configs" / "tiny.yaml"), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    out = cfg.stage_dir("rm")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["world_size"] == 2
    assert manifest["metrics"]["steps"] == 4 and not (out / "checkpoints").exists()
    model, tok = load_reward_model(out, cfg.model)
    _, held, _ = load_preferences(cfg)
    rows, _ = encode_pairs(tok, held, cfg.rm.max_length)
    batch = rm_stage.pair_collate(tok.pad_token_id)(rows)
    with torch.no_grad():
        scores = score_sequences(model, batch["input_ids"], batch["attention_mask"])
    n = len(rows)
    assert float((scores[:n] > scores[n:]).float().mean()) == pytest.approx(manifest["metrics"]["eval_accuracy"])
    assert float((scores[:n] - scores[n:]).mean()) == pytest.approx(manifest["metrics"]["eval_mean_margin"], abs=1e-4)


def test_heldout_split_keeps_every_prompt_on_one_side(tmp_path, tiny_cfg):
    """Separate records that share a prompt (as rlaif_label writes them) never straddle the split."""
    import json as _json

    from stages.rm import load_preferences

    rows = [{"prompt": f"question {q}", "chosen": f"good {q} {k}", "rejected": f"bad {q} {k}"}
            for q in range(20) for k in range(3)]
    path = tmp_path / "shared_prompts.jsonl"
    path.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    cfg = tiny_cfg(f"rm.data.path={path}", "rm.eval_fraction=0.25")
    train, held, _ = load_preferences(cfg)
    train_prompts = {p.prompt[0]["content"] for p in train}
    held_prompts = {p.prompt[0]["content"] for p in held}
    assert len(held_prompts) == 5 and len(train_prompts) == 15
    assert not train_prompts & held_prompts
    assert len(held) == 15 and len(train) == 45


# ------------------------------------------------------------------------------- accuracy per kind of pair
def test_accuracy_by_kind_hand_worked():
    from stages.rm import UNLABELLED, accuracy_by_kind

    rc = torch.tensor([1.0, 0.0, 2.0, 0.5, 3.0])
    rr = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.0])  # right, wrong, right, tie (not right), right
    kinds = ["format", "correctness", "correctness", "format", None]
    assert accuracy_by_kind(rc, rr, kinds) == {
        "correctness": {"n": 2, "accuracy": 0.5}, "format": {"n": 2, "accuracy": 0.5},
        UNLABELLED: {"n": 1, "accuracy": 1.0}}
    assert accuracy_by_kind(rc, rr, [None] * 5) == {}  # no kind column: no breakdown


def test_kind_column_is_carried_and_checked(tmp_path, tiny_cfg):
    rows = [{"prompt": "q1", "chosen": "a", "rejected": "b", "kind": "format"},
            {"prompt": "q2", "chosen": "a", "rejected": "b", "kind": ""},  # blank (a CSV cell): no kind
            {"prompt": "q3", "responses": ["a", "b", "c"], "ranking": [2, 0, 1], "kind": "ranked"},
            {"prompt": "q4", "chosen": "a", "rejected": "b"}]
    cfg = tiny_cfg(f"rm.data.path={write_jsonl(tmp_path / 'kinds.jsonl', rows)}", "rm.eval_fraction=0")
    pairs, _, _ = load_preferences(cfg)
    assert [p.kind for p in pairs] == ["format", None, "ranked", "ranked", "ranked", None]
    assert [row.kind for row in encode_pairs(load_tokenizer_of(cfg), pairs, 64)[0]] == [p.kind for p in pairs]
    bad = write_jsonl(tmp_path / "bad_kind.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "kind": 3}])
    with pytest.raises(DataError, match=r"bad_kind.jsonl:1: 'kind' must be a string"):
        load_preferences(tiny_cfg(f"rm.data.path={bad}"))


def load_tokenizer_of(cfg):
    from pipeline.models import load_tokenizer, prepare_base

    return load_tokenizer(prepare_base(cfg.model), cfg.model, cfg.chat)


def test_rm_reports_heldout_accuracy_per_kind(tmp_path, tiny_cfg):
    """The manifest's eval_accuracy_by_kind equals the saved RM's accuracy on each kind's held-out pairs,
    counted here by scoring those pairs again."""
    rng = random.Random(3)
    rows = []
    for i in range(24):
        words = rng.sample(WORDS, 3)
        kind = ("format", "correctness_house", "correctness_plain")[i % 3]
        rows.append({"prompt": f"Say {words[0]} ({i}).", "chosen": f"{words[0]} {words[1]}",
                     "rejected": f"{words[2]}", "kind": kind})
    path = write_jsonl(tmp_path / "kinds.jsonl", rows)
    cfg = tiny_cfg(f"rm.data.path={path}", "rm.init_from=base", "rm.eval_fraction=0.5", "rm.max_length=64",
                   "rm.train.max_steps=2")
    metrics = rm_stage.run(cfg)
    by_kind = metrics["eval_accuracy_by_kind"]
    manifest = json.loads((cfg.stage_dir("rm") / "manifest.json").read_text())
    assert manifest["metrics"]["eval_accuracy_by_kind"] == by_kind

    model, tok = load_reward_model(cfg.stage_dir("rm"), cfg.model)
    _, held, _ = load_preferences(cfg)
    encoded, _ = encode_pairs(tok, held, cfg.rm.max_length, cfg.chat.system_prompt)
    batch = rm_stage.pair_collate(tok.pad_token_id)(encoded)
    with torch.no_grad():
        scores = score_sequences(model, batch["input_ids"], batch["attention_mask"])
    n = len(encoded)
    expected: dict[str, list[int]] = {}
    for pair, c, r in zip(held, scores[:n].tolist(), scores[n:].tolist()):
        expected.setdefault(pair.kind, []).append(int(c > r))
    assert sorted(by_kind) == sorted(expected)
    for kind, hits in expected.items():
        assert by_kind[kind]["n"] == len(hits)
        assert by_kind[kind]["accuracy"] == pytest.approx(sum(hits) / len(hits), abs=1e-6)
    assert sum(v["n"] for v in by_kind.values()) == metrics["eval_pairs"]
