"""The few-shot (ICL) baseline in the report: the base model prompted with k examples from sft.data, compared
with SFT and each policy by the same verifier, judge and RM as the verdict (report.icl_shots)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import load_config
from pipeline.report import write_report
from tests.helpers.common import write_config
from tests.test_evaluation import _fake_model_stage

REPO = Path(__file__).resolve().parent.parent


def longer_is_better(prompts, responses, references):
    """A verifier for the test: the response length, with a 'nonempty' part."""
    return {"scores": [float(len(r)) for r in responses], "metrics": {"nonempty": [float(bool(r)) for r in responses]}}


def _icl_config(tmp_path: Path, shots: int, extra: str = ""):
    body = ("  max_new_tokens: 8\nsft: {data: {path: data/demo/sft.jsonl}}\n"
            f"report: {{icl_shots: {shots}, verifier: 'tests.test_icl_baseline:longer_is_better'}}\n" + extra)
    return load_config(write_config(tmp_path, body))


def test_shots_are_seeded_and_never_held_out(tmp_path):
    from data.formats import load_examples
    from pipeline.evaluation.baselines import icl_shots
    from pipeline.evaluation.generate import with_shots

    cfg = _icl_config(tmp_path, 4)
    sft, _ = load_examples(cfg.sft.data, "sft")
    users = [ex.messages[[m["role"] for m in ex.messages].index("user")]["content"] for ex in sft]
    held_out = [[{"role": "user", "content": u}] for u in users[:20]]  # the first 20 SFT prompts are held out
    shots = icl_shots(cfg, held_out)
    assert [m["role"] for m in shots] == ["user", "assistant"] * 4
    assert not {m["content"] for m in shots[::2]} & set(users[:20])
    assert shots == icl_shots(cfg, held_out)  # deterministic
    other = icl_shots(load_config(write_config(tmp_path, "seed: 7\nsft: {data: {path: data/demo/sft.jsonl}}\n"
                                                         "report: {icl_shots: 4}\n")), held_out)
    assert other != shots  # the run's seed picks them
    # each shot answers its own user turn, as in sft.data
    pairs = {ex.messages[i]["content"]: ex.messages[i + 1]["content"] for ex in sft
             for i in range(len(ex.messages) - 1) if ex.messages[i]["role"] == "user"}
    assert all(pairs[shots[i]["content"]] == shots[i + 1]["content"] for i in range(0, 8, 2))
    # a system message of the prompt stays first
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert with_shots(shots[:2], prompt) == [prompt[0], *shots[:2], prompt[1]]


def test_icl_rows_in_verdict_and_evaluation(tmp_path):
    """SFT and PPO are the tiny base itself: with 0 shots the base answers exactly as SFT does; with 2 shots it
    answers otherwise, and the verdict gets 'SFT vs ICL' and 'PPO vs ICL' rows by verifier, judge and RM."""
    import torch

    torch.set_num_threads(1)
    from pipeline.evaluation.generate import generate, held_out_prompts
    from pipeline.models import load_tokenizer, prepare_base

    judges = ("rlaif:\n  judges:\n    short: {kind: function, function: 'tests.test_evaluation:prefers_shorter'}\n"
              "rlaif_label: {judge: short}\n")
    cfg = _icl_config(tmp_path, 2, judges)
    base = prepare_base(cfg.model)
    tokenizer = load_tokenizer(base, cfg.model, cfg.chat)
    for stage, kind in (("sft", "causal_lm"), ("ppo", "causal_lm"), ("rm", "seq_cls")):
        _fake_model_stage(cfg, stage, base, tokenizer, kind)
    prompts = held_out_prompts(cfg, 4)
    assert generate(cfg, "icl", prompts, shots=[]) == generate(cfg, "sft", prompts)

    text = write_report(cfg, out=lambda line: None, n_samples=4).read_text()
    verdict = text.split("## Verdict")[1].split("## ")[0]
    assert "| PPO | reward model (rm stage) | 4 | 0 | 0 | 4 | 0.500 |" in verdict  # unchanged PPO vs SFT row
    for who in ("SFT", "PPO"):
        for check in ("verifier tests.test_icl_baseline:longer_is_better", "judge short (function), both orders",
                      "reward model (rm stage)"):
            assert f"| {who} vs ICL (2-shot base) | {check} | 4 |" in verdict, (who, check)
    assert "| SFT vs ICL (2-shot base) | verifier part nonempty | 4 |" in verdict  # the verifier's part, paired
    assert "## Few-shot baseline: the base model with 2 examples (ICL)" in text
    evaluation = json.loads((cfg.run_dir() / "evaluation.json").read_text())
    icl = evaluation["icl"]
    assert icl["shots"] == 2 and len(icl["examples"]) == 4 and set(icl["policies"]) == {"sft", "ppo"}
    sft, ppo = icl["policies"]["sft"]["comparisons"], icl["policies"]["ppo"]["comparisons"]
    assert set(sft) == {"verifier", "judge", "rm"} and sft["rm"]["n"] == 4
    # SFT and PPO are the same model: the same comparison with the ICL baseline
    assert sft["rm"]["wins"] == ppo["rm"]["wins"] and sft["verifier"]["mean_diff"] == ppo["verifier"]["mean_diff"]
    cache = json.loads((cfg.run_dir() / "report" / "samples_icl.json").read_text())
    rows = cache["result"]["results"]["sft"]["rows"]
    assert any(r["icl"] != r["sft"] for r in rows)  # the shots change the base model's answers
    assert "greedy decoding (cached)" in write_report(cfg, out=lambda line: None, n_samples=4).read_text()


def test_no_icl_by_default(tmp_path):
    cfg = load_config(write_config(tmp_path))
    assert cfg.report.icl_shots == 0
