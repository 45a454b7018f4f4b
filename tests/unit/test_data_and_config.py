"""The data contract and config validation: formats, column mapping, bad records, bad configs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from data.formats import DataError, load_examples, parse_hh_transcript
from pipeline.config import ConfigError, DataSource, load_config

from conftest import REPO, shared_data


def _source(path: Path, **kw) -> DataSource:
    return DataSource(path=str(path), **kw)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"messages": [', "invalid JSON"),
        ({"text": "no conversation here"}, "missing column: need 'messages' or 'prompt' + 'completion'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
         "empty assistant turn"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
         "wrong role order: message 0 is 'assistant', expected 'user'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]},
         "messages[1].role is 'robot'"),
    ],
)
def test_bad_sft_record_is_reported_with_file_and_line(tmp_path, bad, message):
    path = _write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        load_examples(_source(path), "sft")
    assert f"{path}:3: " in str(err.value)
    assert message in str(err.value)


def test_skipping_bad_records_within_the_allowed_fraction_is_counted(tmp_path):
    rows = [GOOD] * 9 + ['{"broken']
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    examples, report = load_examples(_source(path, max_bad_fraction=0.2), "sft")
    assert len(examples) == 9 and report.skipped == 1 and report.records == 10
    assert report.skipped_examples[0].startswith(f"{path}:10: invalid JSON")
    with pytest.raises(DataError, match=r"2 of 10 records are bad .* > max_bad_fraction 10.0%"):
        load_examples(_source(_write_jsonl(tmp_path / "b.jsonl", [GOOD] * 8 + ["{", "{"]),
                              max_bad_fraction=0.1), "sft")


def test_prompt_completion_csv_parquet_json_and_gzip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(3)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("d.json", "d.csv", "d.parquet", "d.jsonl.gz"):
        examples, _ = load_examples(_source(tmp_path / name), "sft")
        assert [e.messages[-1]["content"] for e in examples] == ["a0", "a1", "a2"], name
        assert examples[0].messages[0] == {"role": "user", "content": "q0"}
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_examples(_source(tmp_path / "d.txt"), "sft")
    (tmp_path / "e.csv").write_text("prompt,completion\nq,a\nq2,\n")
    with pytest.raises(DataError, match=r"e.csv:3: .*empty assistant turn"):
        load_examples(_source(tmp_path / "e.csv"), "sft")


def test_column_mapping_on_gsm8k():
    path = shared_data("gsm8k", "train.jsonl")
    src = _source(path, columns={"prompt": "question", "completion": "answer"}, max_records=50)
    examples, report = load_examples(src, "sft")
    assert report.kept == 50 and len(examples) == 50
    assert examples[0].messages[0]["role"] == "user" and "####" in examples[0].messages[1]["content"]


def test_column_mapping_on_self_instruct_with_nested_paths():
    path = shared_data("self-instruct", "seed_tasks.jsonl")
    src = _source(path, columns={"prompt": "{instruction}\n\n{instances.0.input}",
                                 "completion": "instances.0.output"}, max_bad_fraction=0.2)
    examples, report = load_examples(src, "sft")
    assert report.records == 175 and report.kept >= 150
    assert all(e.messages[1]["content"].strip() for e in examples)


def test_hh_transcripts_split_at_the_last_assistant_turn():
    path = shared_data("hh-rlhf", "harmless-base", "test.jsonl.gz")
    pairs, report = load_examples(_source(path, max_records=100, max_bad_fraction=0.1), "preference")
    assert report.kept >= 90
    for pair in pairs:
        assert pair.prompt[-1]["role"] == "user"
        assert pair.chosen[0]["role"] == pair.rejected[0]["role"] == "assistant"
        assert pair.chosen != pair.rejected
    msgs = parse_hh_transcript("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]


def test_unknown_config_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "tiny.yaml", ["sft.train.lerning_rate=1e-4"])
    assert "unknown key 'sft.train.lerning_rate'; did you mean 'sft.train.learning_rate'?" in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("run_name: x\nsft:\n  pakcing: true\n")
    with pytest.raises(ConfigError, match=r"unknown key 'sft.pakcing'; did you mean 'sft.packing'\?"):
        load_config(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("sft.train.learning_rate=0", "sft.train.learning_rate: Input should be greater than 0"),
        ("sft.train.per_device_batch_size=two", "sft.train.per_device_batch_size: Input should be a valid integer"),
        ("sft.data.path=missing.jsonl", "sft.data.path: data file not found: missing.jsonl"),
        ("ppo.episodes_per_rollout=10", "must be divisible by ppo.mini_batch_size"),
        ("sft.train.global_batch_size=100", "sft.train.global_batch_size=100"),
        ("model.source=local", "model.source='local' needs model.path"),
        ("sft.train.deepspeed=configs/deepspeed/nope.json", "DeepSpeed config not found"),
        ("sft.tuning.method=lorra", "sft.tuning.method: Input should be"),
        ("run_name=a/b", "run_name must be a plain folder name"),
    ],
)
def test_impossible_values_fail_before_any_model_is_loaded(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "tiny.yaml", [override])
    assert message in str(err.value)


def test_old_flat_ppo_optimisation_keys_are_read_as_ppo_train_with_a_note():
    """PPO's optimisation settings live in ppo.train (the shape of sft.train / rm.train); the old flat
    keys still load, with a FutureWarning naming where each went; ppo.reward_from is dropped with a note."""
    with pytest.warns(FutureWarning, match=r"ppo.weight_decay -> ppo.train.weight_decay"):
        cfg = load_config(REPO / "configs" / "tiny.yaml", ["ppo.weight_decay=0.5", "ppo.precision=fp32"])
    assert cfg.ppo.train.weight_decay == 0.5 and cfg.ppo.train.precision == "fp32"
    assert cfg.ppo.train.save_steps == 2, "the file's ppo.train keys stay"
    with pytest.warns(FutureWarning, match="ppo.reward_from is removed"):
        load_config(REPO / "configs" / "tiny.yaml", ["ppo.reward_from=rm"])
    with pytest.raises(ConfigError, match="ppo.save_steps and ppo.train.save_steps are both set"):
        load_config(REPO / "configs" / "tiny.yaml", ["ppo.save_steps=3"])
    sizes = load_config(REPO / "configs" / "tiny.yaml", ["ppo.gradient_accumulation_steps=2"]).ppo.sizes(2)
    assert (sizes.micro_batch, sizes.n_minibatches, sizes.global_batch, sizes.total_steps) == (4, 2, 32, 2)


def test_rollout_batch_size_is_read_as_episodes_per_rollout_with_a_warning(tmp_path):
    """ppo.rollout_batch_size always counted episodes (prompt, response) per rollout per device, not prompts,
    and OpenRLHF's key of that name counts prompts: renamed ppo.episodes_per_rollout. An old config still
    loads, with a FutureWarning naming the new key, what it counts and how OpenRLHF's differs; both keys
    set is refused."""
    text = (REPO / "configs" / "tiny.yaml").read_text()
    assert "  episodes_per_rollout: 16\n" in text
    old = tmp_path / "old.yaml"
    old.write_text(text.replace("  episodes_per_rollout: 16\n", "  rollout_batch_size: 8\n"))
    with pytest.warns(FutureWarning) as caught:
        cfg = load_config(old, ["ppo.num_samples_per_prompt=2"])
    (message,) = [str(w.message) for w in caught if "rollout_batch_size" in str(w.message)]
    assert "ppo.rollout_batch_size is renamed ppo.episodes_per_rollout" in message
    assert "read as ppo.episodes_per_rollout=8" in message and "not prompts" in message
    assert "OpenRLHF's --rollout_batch_size" in message and "R x K / devices" in message
    assert cfg.ppo.episodes_per_rollout == 8
    # 8 episodes per device = 4 prompts x 2 samples; 2 devices: 16 episodes per step
    sizes = cfg.ppo.sizes(2)
    assert (sizes.episodes_per_rollout, sizes.global_batch, sizes.n_minibatches) == (8, 16, 1)
    with pytest.raises(ConfigError, match="ppo.rollout_batch_size and ppo.episodes_per_rollout are both set"):
        load_config(REPO / "configs" / "tiny.yaml", ["ppo.rollout_batch_size=8"])


def test_a_ppo_stage_made_before_the_rename_stays_up_to_date(tmp_path):
    """The config hash reads ppo.episodes_per_rollout under its former name, so a run folder whose ppo stage
    was hashed with ppo.rollout_batch_size (the section as it was: same value under the old key) is skipped,
    not re-run; a real change is reported with the keys that changed."""
    from pipeline.manifest import hash_json, write_manifest
    from pipeline.plan import decide
    from pipeline.stage import stage_identity, stage_section

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"output_root={tmp_path}"])
    before_rename = stage_section(cfg, "ppo")
    ppo = dict(before_rename["ppo"])
    ppo["rollout_batch_size"] = ppo.pop("episodes_per_rollout")
    ppo["eval_steps"] = ppo.pop("eval_every")  # renamed too, the same way
    before_rename["ppo"] = ppo
    config_hash, input_hash = stage_identity(cfg, "ppo")
    assert config_hash == hash_json(before_rename)
    folder = cfg.stage_dir("ppo")
    folder.mkdir(parents=True)
    write_manifest(folder, {"stage": "ppo", "status": "complete", "config": before_rename,
                            "config_hash": hash_json(before_rename), "input_hash": input_hash})
    assert decide(cfg, "ppo").action == "skip"
    changed = load_config(REPO / "configs" / "tiny.yaml", [f"output_root={tmp_path}", "ppo.episodes_per_rollout=8",
                                                           "ppo.kl_coef=0.1"])
    decision = decide(changed, "ppo")
    assert decision.action == "run"
    assert decision.reason == ("its config changed since it completed "
                               "(ppo.episodes_per_rollout: 16 -> 8; ppo.kl_coef: 0.05 -> 0.1)")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(REPO / "configs" / "tiny.yaml", ["sft.train.max_steps"])
    with pytest.raises(ConfigError, match="'run_name' is a value, not a section"):
        load_config(REPO / "configs" / "tiny.yaml", ["run_name.x=1"])


def test_invalid_yaml_names_the_line(tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("run_name: x\nsft:\n  data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        load_config(cfg)


def test_every_data_file_a_stage_reads_is_in_its_input_hash(tmp_path):
    from pipeline.stage import stage_identity

    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text(json.dumps(GOOD) + "\n")
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"output_root={tmp_path}", f"ppo.ptx_data.path={ptx}"])
    before = stage_identity(cfg, "ppo")
    ptx.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    after = stage_identity(cfg, "ppo")
    assert before[0] == after[0] and before[1] != after[1], "editing the PTX file must re-run PPO"


def test_stage_defaults_do_not_depend_on_which_sibling_keys_are_given(tmp_path):
    """The documented stage defaults (dpo.train learning rate 5e-6, rm.train 5e-5, an hf distill teacher =
    this run's base model) hold whether the section is absent or only some of its keys are given, in a file
    or on the command line; a key given explicitly wins."""
    bare = tmp_path / "bare.yaml"
    bare.write_text("run_name: bare\n")
    absent = load_config(bare)
    partial = load_config(bare, ["dpo.train.max_steps=40", "rm.train.max_steps=40", "distill.teacher.timeout_s=30"])
    in_file = tmp_path / "partial.yaml"
    in_file.write_text("run_name: partial\ndpo: {train: {max_steps: 40}}\nrm: {train: {num_threads: 1}}\n"
                       "distill: {teacher: {kind: hf, timeout_s: 30}}\n")
    for cfg in (absent, partial, load_config(in_file)):
        assert cfg.dpo.train.learning_rate == 5e-6
        assert cfg.rm.train.learning_rate == 5e-5
        assert cfg.sft.train.learning_rate == 2e-4
        assert cfg.distill.teacher.model == "base"
    assert partial.dpo.train.max_steps == 40 and partial.distill.teacher.timeout_s == 30
    given = load_config(bare, ["dpo.train.learning_rate=1e-4", "rm.train.learning_rate=3e-5",
                               "distill.teacher.model=some/model"])
    assert (given.dpo.train.learning_rate, given.rm.train.learning_rate) == (1e-4, 3e-5)
    assert given.distill.teacher.model == "some/model"
    http = load_config(bare, ["distill.teacher.kind=http", "distill.teacher.base_url=http://127.0.0.1:9/v1"])
    assert http.distill.teacher.model is None  # 'base' is an hf teacher's default only
