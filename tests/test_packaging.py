"""alignpipe outside its checkout (pipeline/paths.py, pyproject.toml).

- Relative paths in a config: the config's folder, then the working directory, then the shipped files;
  outputs under the working directory; a stage process resolves with the folders the resolved config
  recorded, whatever its own working directory.
- Configs by name (``tiny``), a misspelt name answered with the closest shipped one.
- Stage hashes do not depend on how a config was found: configs/tiny.yaml by path from the checkout and
  ``tiny`` by name from elsewhere give the same identity; a data file found somewhere else with other
  content is named in the re-run reason, with both places.
- The wheel: built from the sources, installed (no dependencies, no index) into a new virtual environment
  that sees this environment's packages through a .pth file, run as ``alignpipe run tiny`` from an empty
  folder; the checkout's code then decides that every stage of that run is up to date (same hashes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from pipeline import paths
from pipeline.config import ConfigError, config_from_dict, load_config, resolve_path
from pipeline.plan import decide
from pipeline.stage import stage_identity

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def restore_bases():
    before = paths.current_bases()
    yield
    paths.use_bases(before.config_dir, before.work_dir)


def test_input_search_order_and_outputs(tmp_path, monkeypatch):
    config_dir, work = tmp_path / "cfg", tmp_path / "work"
    for folder in (config_dir / "data", work / "data"):
        folder.mkdir(parents=True)
    (config_dir / "data" / "a.jsonl").write_text("{}\n")
    (work / "data" / "a.jsonl").write_text("{}\n")
    (work / "data" / "b.jsonl").write_text("{}\n")
    monkeypatch.chdir(work)
    paths.use_bases(config_dir, work)
    assert resolve_path("data/a.jsonl") == config_dir / "data/a.jsonl"  # 1. the config's folder
    assert resolve_path("data/b.jsonl") == work / "data/b.jsonl"  # 2. the working directory
    assert resolve_path("data/demo/sft.jsonl") == REPO / "data/demo/sft.jsonl"  # 3. the shipped files
    assert resolve_path("data/none.jsonl") == config_dir / "data/none.jsonl"  # none: the first candidate
    assert resolve_path(tmp_path / "x") == tmp_path / "x"
    assert paths.output_path("outputs") == work / "outputs"
    paths.use_bases(config_dir, tmp_path)  # a stage process: its own cwd is elsewhere, the recorded one counts
    assert paths.output_path(".cache/alignpipe") == tmp_path / ".cache/alignpipe"


def test_shipped_resources_are_package_files():
    assert (paths.demo_data_dir() / "house_format" / "sft.jsonl").is_file()
    assert (paths.eval_tasks_dir() / "gsm8k.yaml").is_file()
    assert {"tiny", "demo", "distill-demo"} <= set(paths.shipped_configs())


def test_config_by_name_and_closest_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", ["output_root=out"])
    assert cfg.paths.config_dir == str(REPO / "configs") and cfg.paths.work_dir == str(tmp_path)
    assert cfg.run_dir() == tmp_path / "out" / "tiny"
    assert load_config("configs/tiny.yaml").run_dir() == tmp_path / "outputs" / "tiny"  # a path still works
    with pytest.raises(ConfigError, match="config file not found: tiyn; did you mean 'tiny'"):
        load_config("tiyn")
    with pytest.raises(ConfigError, match=r"config file not found: demo\.yml; did you mean 'demo'\? .*shipped config"):
        load_config("demo.yml")


def test_stage_process_resolves_with_the_recorded_folders(tmp_path, monkeypatch):
    (tmp_path / "mine.jsonl").write_text((REPO / "data/demo/sft.jsonl").read_text())
    config = tmp_path / "run.yaml"
    config.write_text("model: {source: tiny}\nsft: {data: {path: mine.jsonl}}\n")
    monkeypatch.chdir(tmp_path)
    resolved = load_config(config).to_dict()
    monkeypatch.chdir(REPO)  # where stage processes run
    cfg = config_from_dict(json.loads(json.dumps(resolved)))
    assert resolve_path(cfg.sft.data.path) == tmp_path / "mine.jsonl"
    assert cfg.run_dir() == tmp_path / "outputs" / "run"


def test_stage_hash_does_not_depend_on_how_the_config_was_found(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    by_path = load_config("configs/tiny.yaml", [f"output_root={tmp_path}"])
    identities = {stage: stage_identity(by_path, stage) for stage in ("sft", "rm", "ppo", "dpo")}
    monkeypatch.chdir(tmp_path)
    by_name = load_config("tiny", [f"output_root={tmp_path}"])
    assert {stage: stage_identity(by_name, stage) for stage in identities} == identities


def test_a_data_file_found_elsewhere_is_named_in_the_rerun_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNPIPE_STAGE_ENTRY", "tests.fake_stages")
    from pipeline.orchestrator import run_pipeline

    config = tmp_path / "run.yaml"
    config.write_text(f"run_name: t\noutput_root: {tmp_path / 'out'}\nmodel: {{source: tiny}}\nstages: [sft]\n"
                      "sft: {data: {path: data/demo/sft.jsonl}}\n")
    run_pipeline(config, echo=False, report=False, out=lambda line: None)
    local = tmp_path / "data" / "demo" / "sft.jsonl"  # now the config's folder has a file of that name
    local.parent.mkdir(parents=True)
    local.write_text((REPO / "data/demo/sft.jsonl").read_text().splitlines()[0] + "\n")
    decision = decide(load_config(config), "sft")
    assert decision.action == "run"
    assert decision.reason == ("its inputs changed since it completed (data file data/demo/sft.jsonl changed "
                               f"(read from {local}, was {REPO / 'data/demo/sft.jsonl'}))")


def _build_and_install(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the sources, install it into a new venv; return the venv's python."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("pipeline", "stages", "data", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(dist)], check=True, capture_output=True, text=True, timeout=300)
    wheel = next(dist.glob("alignpipe-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # this environment's packages (torch, transformers, pip ...) but not its editable alignpipe: a plain path
    # line, so the .pth files there (the editable finder) are not run
    Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    return python


def test_wheel_runs_the_tiny_config_by_name_from_an_empty_folder(tmp_path):
    started = time.time()
    python = _build_and_install(tmp_path)
    alignpipe = python.parent / "alignpipe"
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ALIGNPIPE_STAGE_ENTRY")}
    env["HF_HUB_OFFLINE"] = "1"
    where = subprocess.run([str(python), "-c", "import pipeline; print(pipeline.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert str(tmp_path / "venv") in where  # the installed copy, not the checkout
    usage = subprocess.run([str(alignpipe), "--help"], cwd=work, env=env, capture_output=True, text=True, check=True)
    assert usage.stdout.rstrip().splitlines()[-1].startswith("  alignpipe run --help ")  # the console script's name
    small = ["sft.train.max_steps=2", "rm.train.max_steps=2", "ppo.total_episodes=16"]
    run = subprocess.run([str(alignpipe), "run", "tiny", "--no-report", *small], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    status = subprocess.run([str(alignpipe), "status", "tiny", *small], cwd=work, env=env, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0 and status.stdout.count("(up to date)") == 3, status.stdout + status.stderr
    run_dir = work / "outputs" / "tiny"
    manifest = json.loads((run_dir / "sft" / "manifest.json").read_text())
    installed_data = Path(where).parent.parent / "data" / "demo" / "sft.jsonl"
    assert manifest["data_locations"] == {"data/demo/sft.jsonl": str(installed_data)}
    # the checkout's code agrees on every stage's hashes: nothing to re-run
    cfg = load_config(REPO / "configs" / "tiny.yaml", [*small, f"output_root={work / 'outputs'}"])
    assert [decide(cfg, stage).action for stage in ("sft", "rm", "ppo")] == ["skip"] * 3
    print(f"wheel build + install + tiny run from the wheel: {time.time() - started:.1f} s")
