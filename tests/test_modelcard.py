"""Model cards in model/ and adapter/ (pipeline/modelcard.py) and ``pipeline push`` (pipeline/hub.py).

No network: the upload is checked against a fake ``huggingface_hub.HfApi`` and with ``--dry-run``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.hub import push
from pipeline.launch import ENTRY_ENV
from pipeline.manifest import read_manifest, write_manifest
from pipeline.modelcard import card_metadata, read_card_metadata, write_model_cards
from pipeline.orchestrator import run_pipeline

SECRET = "hf_secret_token_never_printed"
REPO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def card_parts(path: Path) -> tuple[dict, str]:
    text = path.read_text()
    assert text.startswith("---\n")
    return read_card_metadata(path), text.split("\n---\n", 1)[1]


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """sft -> rm -> ppo with the fake stages (seconds); returns the run folder."""
    monkeypatch.setenv(ENTRY_ENV, "tests.fake_stages")
    for knob in ("FAKE_STEPS", "FAKE_SLEEP", "FAKE_FAIL", "FAKE_CRASH"):
        monkeypatch.delenv(knob, raising=False)
    config = tmp_path / "run.yaml"
    config.write_text(f"run_name: cards\noutput_root: {tmp_path / 'out'}\nmodel: {{source: tiny}}\n"
                      "ppo:\n  data: {path: data/demo/prompts.jsonl}\n")
    run_pipeline(config, [], echo=False, report=False, out=lambda line: None)
    return load_config(config).run_dir()


def test_completed_stage_gets_a_hub_card(fake_run):
    for stage in ("sft", "rm", "ppo"):
        meta, body = card_parts(fake_run / stage / "model" / "README.md")
        manifest = read_manifest(fake_run / stage)
        assert meta["library_name"] == "transformers" and "alignpipe" in meta["tags"]
        assert meta["alignpipe"]["stage"] == stage and meta["alignpipe"]["run"] == "cards"
        assert meta["alignpipe"]["config_hash"] == manifest["config_hash"]
        assert {p: v["hash"] for p, v in manifest["parents"].items()} == meta["alignpipe"]["parents"]
        assert f"# cards / {stage}" in body and "## Key settings" in body and "## Results" in body
    ppo_meta, ppo_body = card_parts(fake_run / "ppo" / "model" / "README.md")
    assert ppo_meta["tags"][:3] == ["alignpipe", "ppo", "rlhf"] and ppo_meta["pipeline_tag"] == "text-generation"
    # the data file with its hash, in the metadata and the body
    prompts = read_manifest(fake_run / "ppo")["data_files"]
    assert ppo_meta["alignpipe"]["data_files"] == [{"path": p, "sha256": h} for p, h in prompts.items()]
    assert all(h in ppo_body for h in prompts.values())
    assert "| score | 0.3 |" in ppo_body and "| kl_coef |" in ppo_body  # measured result, a key setting
    rm_meta, _ = card_parts(fake_run / "rm" / "model" / "README.md")
    assert rm_meta["pipeline_tag"] == "text-classification" and "reward-model" in rm_meta["tags"]
    # a tiny random base: no hub id, no licence, and the card says so
    assert "base_model" not in ppo_meta and "license" not in ppo_meta
    assert "licence was not found" in ppo_body


def test_card_of_a_hub_base_with_adapter_and_licence(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# base\n")
    stage_dir = tmp_path / "sft"
    (stage_dir / "model").mkdir(parents=True)
    (stage_dir / "adapter").mkdir()
    (stage_dir / "adapter" / "README.md").write_text("peft's template card\n")
    manifest = {"stage": "sft", "status": "complete", "run_name": "r", "base_model": str(base),
                "tuning_method": "lora", "config_hash": "c1", "chat_fingerprint": "f1",
                "config": {"model": {"source": "hub", "path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                           "sft": {"data": {"path": "hub:org/chat-data"}, "max_length": 96,
                                   "train": {"learning_rate": 5e-4, "max_steps": 40},
                                   "tuning": {"method": "lora", "lora_r": 8}}},
                "data_files": {}, "parents": {}, "metrics": {"eval_loss": 0.56, "steps": 40, "packing": False},
                "wall_time_s": 12.5, "libraries": {"torch": "2.x"}}
    written = write_model_cards(stage_dir, manifest)
    assert [p.parent.name for p in written] == ["model", "adapter"]
    meta, body = card_parts(stage_dir / "adapter" / "README.md")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "peft" and meta["datasets"] == ["org/chat-data"] and "lora" in meta["tags"]
    assert "AutoPeftModelForCausalLM" in body and "| train.learning_rate | 0.0005 |" in body
    assert "| tuning.lora_r | 8 |" in body and "| eval_loss | 0.56 |" in body and "packing" not in body
    assert card_metadata(manifest, "model")["library_name"] == "transformers"
    # the YAML block is what the hub parses: plain YAML, no Python tags
    assert "!!python" not in (stage_dir / "model" / "README.md").read_text()
    assert yaml.safe_load((stage_dir / "model" / "README.md").read_text().split("---")[1])["license"] == "apache-2.0"


def test_push_dry_run_lists_files_and_refuses_bad_input(fake_run, capsys):
    assert main(["push", str(fake_run), "ppo", "--repo", "me/ppo-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would send" in out and "hub:me/ppo-tiny" in out
    assert "README.md" in out and "weights.txt" in out
    # no adapter in the fake stages; a stage that is not complete; a bad repo name
    assert main(["push", str(fake_run), "ppo", "--repo", "me/x", "--adapter", "--dry-run"]) == 2
    manifest = read_manifest(fake_run / "rm")
    write_manifest(fake_run / "rm", {**manifest, "status": "failed"})
    assert main(["push", str(fake_run), "rm", "--repo", "me/x", "--dry-run"]) == 2
    assert "only a complete stage" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--repo"):
        push(str(fake_run), "sft", "a/b/c", dry_run=True, out=lambda line: None)


def test_push_uploads_the_folder_with_its_card_through_hfapi(fake_run, monkeypatch, capsys):
    calls: list[tuple[str, dict]] = []

    class FakeHfApi:
        def __init__(self, token=None):
            calls.append(("init", {"token": token}))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            folder = Path(kwargs["folder_path"])
            calls.append(("upload_folder", {**kwargs, "files": sorted(p.name for p in folder.iterdir())}))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    (fake_run / "sft" / "model" / "README.md").unlink()  # a stage from before cards: written on push
    assert main(["push", str(fake_run), "sft", "--repo", "me/sft-tiny", "--private"]) == 0
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert [c[0] for c in calls] == ["init", "create_repo", "upload_folder"]
    assert calls[0][1]["token"] == SECRET
    assert calls[1][1] == {"repo_id": "me/sft-tiny", "private": True, "exist_ok": True}
    upload = calls[2][1]
    assert upload["repo_id"] == "me/sft-tiny" and Path(upload["folder_path"]) == fake_run / "sft" / "model"
    assert upload["files"] == ["README.md", "weights.txt"]
    assert "pushed: https://huggingface.co/me/sft-tiny" in captured.out
    assert json.dumps(calls).count(SECRET) == 1  # only handed to HfApi itself


def test_card_of_a_gguf_base_names_its_hub_id_and_the_files_licence(tmp_path):
    """A GGUF base (as the demo's SmolLM2): base_model from ``model.hub_id``, the licence from the file's
    ``general.license``."""
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "base.gguf", "llama")
    writer.add_license("mit")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    stage_dir = tmp_path / "sft"
    (stage_dir / "model").mkdir(parents=True)
    model = {"source": "gguf", "path": str(tmp_path), "gguf_file": "base.gguf", "hub_id": "org/base-model"}
    manifest = {"stage": "sft", "status": "complete", "run_name": "r", "config": {"model": model},
                "data_files": {}, "parents": {}, "metrics": {}}
    write_model_cards(stage_dir, manifest)
    meta, body = card_parts(stage_dir / "model" / "README.md")
    assert meta["base_model"] == "org/base-model" and meta["license"] == "mit"
    with pytest.raises(ConfigError, match="hub_id"):
        load_config(REPO_CONFIG, ["model.hub_id=not a hub id"])
