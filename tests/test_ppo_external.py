"""PPO scores exactly what the policy generated, and runs on models you bring (DESIGN §3, §7).

- the token ids the reward model scores are the ids generated (prompt ids + response up to eos), and a
  response cut off at max_new_tokens is not scored as finished; it pays the missing-eos penalty;
- reward functions get ``has_eos`` and ``response_ids`` and their extra metrics are logged;
- ``ppo`` alone, with a policy folder and a reward model folder (same tokenizer, not trained by the rm
  stage: read as transformers reads it, text scoring, critic from the RM), and with a reward model whose
  tokenizer and template differ (text scoring in its own template, critic from the policy);
- a tokenizer without a chat template stops the run with the ``chat.template`` hint, ``validate`` says
  which template is in force, and a reward source that needs an RM the run will not have is a config error.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.common import metrics_rows

REPO = Path(__file__).resolve().parent.parent

# another chat format for the second tiny tokenizer: bos first, "### role:" headers (prefix-stable, eos-closed)
OTHER_TEMPLATE = (
    "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '### ' + m['role'] + ':\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
)


def _base(cfg) -> str:
    from pipeline.models import prepare_base

    return prepare_base(cfg.model)


def _reward_model(cfg, folder: Path, weights_from: str, tokenizer, seed: int) -> Path:
    """A sequence classifier with one label (random head) saved as a plain HF folder with its tokenizer."""
    from pipeline.models import load_model, save_tokenizer

    torch.manual_seed(seed)
    model = load_model(weights_from, cfg.model, tokenizer, kind="seq_cls")
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)
    return folder


@pytest.fixture
def same_tokenizer_rm(tiny_cfg, tmp_path):
    from pipeline.models import load_tokenizer

    cfg = tiny_cfg()
    base = _base(cfg)
    return _reward_model(cfg, tmp_path / "rm-same", base, load_tokenizer(base, cfg.model, cfg.chat), seed=1)


@pytest.fixture
def other_tokenizer_rm(tiny_cfg, tmp_path):
    """A tiny RM with its own tokenizer (another vocabulary) and chat template."""
    from pipeline.models import build_tiny_model, load_tokenizer

    cfg = tiny_cfg()
    other = cfg.model.model_copy(update={"tiny": cfg.model.tiny.model_copy(update={"vocab_size": 400, "seed": 3})})
    causal = tmp_path / "other-base"
    build_tiny_model(other, causal)
    tok = load_tokenizer(str(causal), cfg.model)
    tok.chat_template = OTHER_TEMPLATE
    return _reward_model(cfg, tmp_path / "rm-other", str(causal), tok, seed=2)


# ------------------------------------------------------------------------- 1. what the RM scores
def test_the_rollout_scores_the_ids_it_generated_and_penalises_missing_eos(tiny_cfg, same_tokenizer_rm, monkeypatch):
    """make_rollout: the RM input of every episode is its prompt ids + generated ids up to and including
    eos (nothing decoded and re-rendered) when the RM is one the rm stage trained (its reading file says
    so); responses cut at max_new_tokens do not end in eos and pay the default missing-eos penalty."""
    import stages.scoring
    from pipeline.stage import StageRun
    from stages.engine import init_distributed
    from stages.ppo.trainer import PPOTrainer

    seen: list[list[int]] = []
    real = stages.scoring.score_token_ids

    def spy(model, sequences, pad_token_id, *args, **kwargs):
        seen.extend(list(s) for s in sequences)
        return real(model, sequences, pad_token_id, *args, **kwargs)

    monkeypatch.setattr(stages.scoring, "score_token_ids", spy)
    stages.scoring.write_reading_file(same_tokenizer_rm, 128, None)  # as the rm stage marks its model/
    cfg = tiny_cfg("stages=[ppo]", f"ppo.policy.path={_base(tiny_cfg())}",
                   f"ppo.reward_model.path={same_tokenizer_rm}", "ppo.max_new_tokens=3", "ppo.total_episodes=16")
    assert cfg.ppo.missing_eos_penalty == 1.0, "on by default"
    with StageRun(cfg, "ppo") as run:
        tr = PPOTrainer(cfg, run, init_distributed())
        assert tr.rewards.rm_scoring == "token_ids"
        indices, _ = tr.step_prompts(0)
        rollout = tr.make_rollout(0, {})
    eos = tr.tokenizer.eos_token_id
    expected = [tr.prompts[i].ids + rollout.response_ids[j][rollout.response_mask[j].bool()].tolist()
                for j, i in enumerate(indices)]
    assert seen == expected, "the RM scores exactly the ids the policy generated"
    assert not bool(rollout.has_eos.all()), "3-token responses of a random model: some are cut off"
    for ids, finished in zip(seen, rollout.has_eos.tolist()):
        assert (ids[-1] == eos) == finished, "a cut-off response is never scored as finished"
    penalty = torch.where(rollout.has_eos, 0.0, 1.0)
    torch.testing.assert_close(rollout.reward, rollout.score - penalty)
    assert rollout.reward_stats["missing_eos_penalty"] == pytest.approx(float(penalty.mean()))


def eos_aware_reward(prompts, responses, references, has_eos, response_ids):
    """A reward function using the optional arguments (used by the test below)."""
    return {"scores": [1.0 if finished else 0.0 for finished in has_eos],
            "metrics": {"ids": [len(r) for r in response_ids], "finished": [float(f) for f in has_eos],
                        "sometimes": [None] * len(responses)}}


def kwargs_reward(prompts, responses, references, **extra):
    return [float(len(extra["response_ids"][i]) + extra["has_eos"][i]) for i in range(len(responses))]


def test_reward_functions_get_eos_and_ids_and_their_metrics_are_logged(tiny_cfg):
    from stages.ppo import trainer
    from stages.ppo.rewards import Responses, RewardSources, digit_fraction

    # unit: keyword detection (named, **kwargs, plain text signature) and the dict return
    sources = RewardSources([SimpleNamespace(kind="function", function=f"tests.test_ppo_external:{n}", weight=w)
                             for n, w in (("eos_aware_reward", 1.0), ("kwargs_reward", 0.5))]
                            + [SimpleNamespace(kind="function", function="stages.ppo.rewards:digit_fraction",
                                               weight=1.0)], tiny_cfg(), None, None, 32, torch.device("cpu"))
    batch = Responses([[{"role": "user", "content": "q"}]] * 2, [[1, 2]] * 2, [[5, 6, 9], [5]], [True, False],
                      ["a 1", "b"], [None] * 2)
    out = sources.score(batch)
    assert out.parts["eos_aware_reward"].tolist() == [1.0, 0.0]
    assert out.parts["kwargs_reward"].tolist() == [4.0, 1.0]
    assert out.parts["digit_fraction"].tolist() == pytest.approx(digit_fraction([], ["a 1", "b"], []))
    assert out.total.tolist() == pytest.approx([1 + 2 + 0.5, 0.5 + 0])
    assert out.metrics["ids"].tolist() == [3.0, 1.0] and torch.isnan(out.metrics["sometimes"]).all()

    # a run: the metrics are logged as reward_metric/<name> means per step
    cfg = tiny_cfg("stages=[ppo]", "ppo.policy_from=base", "ppo.total_episodes=32", "ppo.max_new_tokens=6",
                   "ppo.rewards=[{kind: function, function: 'tests.test_ppo_external:eos_aware_reward'}]")
    trainer.run(cfg)
    rows = [r for r in metrics_rows(cfg.stage_dir("ppo")) if "score" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["reward_metric/ids"] == pytest.approx(r["response_length"]), "ids up to and including eos"
        assert r["reward_metric/finished"] == pytest.approx(r["eos_rate"]) == pytest.approx(r["score"])
        assert r["missing_eos_penalty"] == pytest.approx(1.0 - r["eos_rate"])
        assert r["reward"] == pytest.approx(r["score"] - r["missing_eos_penalty"], abs=1e-6)


# ------------------------------------------------------------------------ 3. models you bring
def test_ppo_alone_on_a_policy_folder_and_a_reward_model_folder(tiny_cfg, same_tokenizer_rm):
    """stages: [ppo] with ppo.policy and ppo.reward_model (same tokenizer, not trained by the rm stage): no
    sft/rm parents, read as transformers reads it (text scoring, even with equal fingerprints), critic from
    the RM, all recorded in the manifest; touching the RM re-runs the stage."""
    from pipeline.plan import check_parents, decide
    from pipeline.stage import parents_of, stage_identity
    from stages.ppo import trainer

    base = _base(tiny_cfg())
    cfg = tiny_cfg("stages=[ppo]", f"ppo.policy.path={base}", f"ppo.reward_model.path={same_tokenizer_rm}",
                   "ppo.total_episodes=32", "ppo.max_new_tokens=8")
    assert cfg.ppo.policy_from == "path" and parents_of(cfg, "ppo") == []
    check_parents(cfg, "ppo", set(), print)  # nothing to check: no sft/rm folder exists, none is needed
    final = trainer.run(cfg)
    manifest = json.loads((cfg.stage_dir("ppo") / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["parents"] == {}
    assert manifest["rm_scoring"] == "text" and manifest["rm_source"] == str(same_tokenizer_rm)
    assert manifest["reward_model_read"] == "transformers_last_non_pad"
    assert manifest["critic_from"] == "rm" and manifest["critic_source"] == str(same_tokenizer_rm)
    assert manifest["policy_source"] == base
    assert set(manifest["external_models"]) == {"ppo.policy.path", "ppo.reward_model.path"}
    assert final["steps"] == 2 and "score/rm" in metrics_rows(cfg.stage_dir("ppo"))[-1]
    assert (cfg.stage_dir("ppo") / "model" / "model.safetensors").exists()
    assert decide(cfg, "ppo").action == "skip"
    before = stage_identity(cfg, "ppo")[1]
    (same_tokenizer_rm / "README.md").write_text("retrained")
    assert stage_identity(cfg, "ppo")[1] != before and decide(cfg, "ppo").action == "run"


def test_a_reward_model_with_another_tokenizer_scores_text_in_its_own_template(tiny_cfg, other_tokenizer_rm):
    from pipeline.models import load_model, load_tokenizer
    from pipeline.stage import StageRun
    from stages.engine import init_distributed
    from stages.ppo import trainer
    from stages.ppo.rewards import Responses, RewardSources
    from stages.ppo.rollout import encode_prompts
    from stages.ppo.trainer import PPOTrainer

    cfg = tiny_cfg()
    base = _base(cfg)
    tok = load_tokenizer(base, cfg.model, cfg.chat)
    rm_tok = load_tokenizer(str(other_tokenizer_rm), cfg.model, foreign=True)
    assert len(rm_tok) != len(tok) and rm_tok.chat_template == OTHER_TEMPLATE
    rm = load_model(str(other_tokenizer_rm), cfg.model, rm_tok, kind="seq_cls").eval()
    sources = RewardSources([SimpleNamespace(kind="rm", weight=1.0)], cfg, tok, rm, 64, torch.device("cpu"),
                            rm_tokenizer=rm_tok)
    assert sources.rm_scoring == "text"
    prompt = encode_prompts(tok, [SimpleNamespace(prompt=[{"role": "user", "content": "What is 2 plus 2?"}],
                                                  reference=None)], 64, None)[0]
    words = tok("It is four", add_special_tokens=False)["input_ids"]
    batch = Responses([prompt.messages] * 2, [prompt.ids] * 2, [words + [tok.eos_token_id], words], [True, False],
                      ["It is four"] * 2, [None] * 2)
    (finished, cut), _ = sources.rm_inputs(batch)
    assert finished[0] == rm_tok.bos_token_id and finished[-1] == rm_tok.eos_token_id
    assert rm_tok.decode(finished).endswith("### assistant:\nIt is four" + rm_tok.eos_token)
    assert cut == finished[:-1], "an unfinished response loses the closing eos its template would add"
    scores, _ = sources.rm_scores(batch)
    assert torch.isfinite(scores).all() and float(scores[0]) != pytest.approx(float(scores[1]))

    # the run: text scoring and a critic from the policy (the RM cannot be one), recorded in the manifest
    run_cfg = tiny_cfg("stages=[ppo]", f"ppo.policy.path={base}", f"ppo.reward_model.path={other_tokenizer_rm}",
                       "ppo.total_episodes=16", "ppo.max_new_tokens=8", "ppo.reward_model.max_length=40")
    trainer.run(run_cfg)
    manifest = json.loads((run_cfg.stage_dir("ppo") / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rm_scoring"] == "text"
    assert manifest["reward_model_read"] == "transformers_last_non_pad"
    assert manifest["critic_from"] == "policy" and manifest["critic_source"].startswith(base)
    assert "rm_truncated" in metrics_rows(run_cfg.stage_dir("ppo"))[-1]
    # asking for a critic from it is refused, saying why
    bad = tiny_cfg("stages=[ppo]", f"ppo.policy.path={base}", f"ppo.reward_model.path={other_tokenizer_rm}",
                   "ppo.critic_from=rm", "run_name=bad")
    with StageRun(bad, "ppo") as run, pytest.raises(ValueError, match="critic_from='rm' needs a reward model"):
        PPOTrainer(bad, run, init_distributed())


def test_a_tokenizer_without_chat_template_stops_with_the_hint(tiny_cfg, tmp_path, capsys):
    from transformers import AutoTokenizer

    from pipeline.cli import main
    from pipeline.config import ChatConfig, ConfigError
    from pipeline.models import describe_chat_templates, load_tokenizer

    cfg = tiny_cfg()
    base = _base(cfg)
    bare = tmp_path / "bare-tokenizer"
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = None
    tok.save_pretrained(bare)
    with pytest.raises(ConfigError, match=r"no chat template.*chat\.template.*'chat\.template: raw'"):
        load_tokenizer(str(bare), cfg.model, cfg.chat)
    raw = load_tokenizer(str(bare), cfg.model, ChatConfig(template="raw"))
    messages = [{"role": "user", "content": "Question: 2+2?\nAnswer:"}, {"role": "assistant", "content": " 4"}]
    assert raw.apply_chat_template(messages, tokenize=False) == "Question: 2+2?\nAnswer: 4" + raw.eos_token
    assert "<|im_start|>" in load_tokenizer(str(bare), cfg.model, ChatConfig(template="chatml")).chat_template

    # validate: reports the template in force, and stops on the bare tokenizer before any model loads
    config = tmp_path / "run.yaml"
    config.write_text(f"output_root: {tmp_path / 'out'}\nstages: [ppo]\n"
                      "ppo:\n  data: {path: data/demo/prompts.jsonl}\n"
                      f"  policy: {{path: {base}, tokenizer: {bare}}}\n"
                      "  rewards: [{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]\n")
    assert main(["validate", str(config)]) == 2
    assert "chat.template" in capsys.readouterr().err
    assert main(["validate", str(config), "chat.template=raw"]) == 0
    assert "ppo.policy: chat template 'raw' (built in; chat.template)" in capsys.readouterr().out
    lines = describe_chat_templates(tiny_cfg())
    assert lines == ["model: chat template ChatML (set by the tiny model builder)"]


def test_config_refuses_a_reward_source_without_a_reward_model(tiny_cfg, tmp_path):
    from pipeline.config import ConfigError
    from pipeline.plan import select_stages

    with pytest.raises(ConfigError, match=r"ppo\.rewards\[0\] is kind 'rm', but this run has no reward model"):
        tiny_cfg("stages=[ppo]", "ppo.policy_from=base")
    with pytest.raises(ConfigError, match=r"ppo\.critic_from is 'rm'"):
        tiny_cfg("stages=[ppo]", "ppo.policy_from=base", "ppo.critic_from=rm",
                 "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]")
    with pytest.raises(ConfigError, match="ppo.policy_from is 'sft' but stages"):
        tiny_cfg("stages=[rm, ppo]")
    with pytest.raises(ConfigError, match="ppo.policy is set but ppo.policy_from='sft'"):
        tiny_cfg(f"ppo.policy.path={tmp_path}", "ppo.policy_from=sft")
    with pytest.raises(ConfigError, match="model folder not found"):
        tiny_cfg("ppo.reward_model.path=./no/such/rm")
    assert tiny_cfg("stages=[rm, ppo]", "ppo.policy_from=base").ppo.reward_model is None
    assert tiny_cfg("stages=[ppo]", "ppo.policy_from=base", f"ppo.reward_model.path={tmp_path}").stages == ["ppo"]
    assert tiny_cfg("stages=[ppo]", "ppo.policy.path=hub:org/policy",
                    "ppo.reward_model.path=org/rm").ppo.policy_from == "path"
    # adding ppo from the command line to a run without a reward model: the same error, as a ConfigError
    cfg = tiny_cfg("stages=[sft]")
    with pytest.raises(ConfigError, match="no reward model"):
        select_stages(cfg, ["sft", "ppo"])
