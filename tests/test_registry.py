"""The stage registry (pipeline/registry.py): a stage declared outside the project runs through ``run``,
``status``, ``slurm`` and ``report`` with no project file naming it; the built-in specs agree with the stages'
code."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOY = "tests.toy_stage:SPEC"


def _toy_config(tmp_path: Path, **toy: object) -> Path:
    config = tmp_path / "toy.yaml"
    config.write_text(json.dumps({
        "run_name": "plugin", "output_root": str(tmp_path / "outputs"), "logging": {"progress_bar": False},
        "extra_stages": [TOY], "stages": ["toy"], "toy": {"message": "hello from a plugin", "repeat": 3, **toy}}))
    return config


def test_a_plugin_stage_runs_through_run_status_slurm_and_report(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main
    from pipeline.manifest import read_manifest

    monkeypatch.delenv("ALIGNPIPE_STAGE_ENTRY", raising=False)  # the real stage entry: python -m stages toy
    config = _toy_config(tmp_path)
    run_dir = tmp_path / "outputs" / "plugin"

    assert main(["slurm", str(config)]) == 0  # scripts only (no --submit)
    script = (run_dir / "slurm" / "toy.sbatch").read_text()
    assert "-m pipeline.launch toy --config" in script  # which starts python -m stages toy on each node

    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert "stage toy: ZeRO-0, 1 device(s)" in out  # its memory plan, before it runs
    assert re.search(r"\[toy\] complete in [\d.]+ s: lines=3, chars=60", out), out
    manifest = read_manifest(run_dir / "toy")
    assert manifest["status"] == "complete" and manifest["metrics"] == {"lines": 3, "chars": 60}
    assert (run_dir / "toy" / "artifact.txt").read_text() == "hello from a plugin\n" * 3
    assert json.loads((run_dir / "config.resolved.json").read_text())["extra_stages"] == [TOY]

    assert main(["status", str(config)]) == 0
    status = capsys.readouterr().out
    assert re.search(r"toy\s+complete, [\d.]+ s \(up to date\)", status), status

    report = (run_dir / "report.md").read_text()
    assert "## Toy" in report and "The toy stage wrote 3 line(s): `hello from a plugin`" in report
    assert "![Toy characters](report/toy_chars.png)" in report and (run_dir / "report" / "toy_chars.png").exists()

    # a change of its own settings makes it stale: its section is part of its identity like a built-in's
    assert main(["status", str(config), "toy.repeat=2"]) == 0
    assert re.search(r"toy\s+complete, [\d.]+ s \(stale: config changed", capsys.readouterr().out)


def test_a_plugin_stage_with_a_parent_copies_its_model_and_is_planned(tmp_path, tiny_cfg):
    from pipeline.config import load_config
    from pipeline.memory import estimate
    from pipeline.registry import parents_of, stage_names
    from stages import run_stage
    from tests.fake_stages import run_fake

    cfg = load_config(_toy_config(tmp_path, copy_from="sft"), ["stages=[sft, toy]"])
    assert stage_names(cfg).index("ppo") < stage_names(cfg).index("toy") < stage_names(cfg).index("dpo")
    assert parents_of(cfg, "toy") == ["sft"]
    plan = estimate(cfg, "toy")
    own = [r.role for r in plan.roles if r.role not in ("runtime", "cpu_heap")]  # those come with every plan
    assert own == ["toy_model"] and plan.role("toy_model").weights > 0
    run_fake(cfg, "sft")  # a complete sft stage with model/weights.txt
    assert run_stage("toy", cfg) == {"lines": 3, "chars": 60}
    assert (cfg.stage_dir("toy") / "model" / "weights.txt").read_text().startswith("sft ")
    # a built-in config does not know it
    with pytest.raises(ValueError, match="unknown stage 'toy'"):
        run_stage("toy", tiny_cfg())


def test_unknown_or_clashing_plugin_entries_are_config_errors(tmp_path):
    from pipeline.config import ConfigError, load_config

    config = _toy_config(tmp_path)
    with pytest.raises(ConfigError, match="extra_stages: stage entry 'tests.no_such_module:SPEC' cannot be loaded"):
        load_config(config, ["extra_stages=[tests.no_such_module:SPEC]"])
    with pytest.raises(ConfigError, match="declares the stage 'sft', which another stage already has"):
        load_config(config, [f"extra_stages=[{TOY}, tests.test_registry:SFT_AGAIN]"])
    with pytest.raises(ConfigError, match=r"unknown stage 'toyy'; did you mean 'toy'\?"):
        load_config(config, ["stages=[toyy]"])


def _sft_again():
    import dataclasses

    from pipeline.registry import load_spec

    return dataclasses.replace(load_spec("stages.sft_config:SPEC"), order=99)


SFT_AGAIN = _sft_again()  # another stage named "sft": a clash


# ------------------------------------------------------------------------ the built-in stages' specs
def _stage_files(spec) -> list[Path]:
    """The source files of a built-in stage: its package, or its module and declaration module."""
    module = spec.config_model.__module__  # stages.ppo.config / stages.sft_config
    if module.endswith(".config"):
        return sorted((REPO / Path(*module.split(".")[:-1])).rglob("*.py"))
    stem = module.removeprefix("stages.").removesuffix("_config")
    return [REPO / "stages" / f"{stem}.py", REPO / "stages" / f"{stem}_config.py"]


def _sections_read(path: Path, names: set[str]) -> set[str]:
    """The stage sections a file reads as ``cfg.<name>`` / ``self.cfg.<name>`` / ``getattr(cfg, "<name>")``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in names:
            base = node.value
            if (isinstance(base, ast.Name) and base.id == "cfg") or (
                    isinstance(base, ast.Attribute) and base.attr == "cfg"):
                found.add(node.attr)
    return found


def test_a_stage_reads_another_stage_s_settings_only_where_its_spec_declares_it():
    """Each built-in stage's code reads ``cfg.<other stage>`` only for the sections its spec lists in
    ``reads`` (docs/ARCHITECTURE.md lists them); a reader outside the stage's own files (the shared
    stages/ modules) reads no stage section at all."""
    from pipeline.registry import specs

    names = {spec.name for spec in specs()}
    owned: set[Path] = set()
    for spec in specs():
        files = _stage_files(spec)
        owned.update(files)
        read = set().union(*(_sections_read(f, names) for f in files)) - {spec.name}
        assert read <= set(spec.reads), f"{spec.name} reads {sorted(read - set(spec.reads))} undeclared"
    shared = {p: _sections_read(p, names) for p in (REPO / "stages").rglob("*.py") if p not in owned}
    assert {p.relative_to(REPO).as_posix(): r for p, r in shared.items() if r} == {}


def test_built_in_order_puts_parents_first():
    """Every parent a built-in stage can have comes earlier in the pipeline order (a config that runs them all)."""
    from pipeline.config import load_config
    from pipeline.registry import parents_of, stage_names

    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        "stages=[distill, sft, rlaif_label, rm, best_of_n, ppo, dpo]", "distill.data={path: data/demo/prompts.jsonl}",
        "best_of_n.data={path: data/demo/prompts.jsonl}", "best_of_n.rewards=[{kind: rm}]"])
    order = stage_names(cfg)
    assert order == ("distill", "sft", "rlaif_label", "rm", "best_of_n", "ppo", "dpo")
    for stage in order:
        assert all(order.index(p) < order.index(stage) for p in parents_of(cfg, stage)), stage


def test_reading_a_config_and_its_stage_specs_imports_no_model_library(tmp_path):
    """The declaration modules are light: loading a config (built-in and plugin stages), its specs, parents and
    status text needs neither torch nor transformers (``pipeline status`` stays fast)."""
    import subprocess
    import sys

    config = _toy_config(tmp_path, copy_from="sft")
    code = ("import sys; from pipeline.config import load_config; from pipeline.registry import stage_specs; "
            "from pipeline.orchestrator import format_status; "
            f"cfg = load_config({str(config)!r}, ['stages=[sft, toy]']); "
            "[s.parents(cfg) for s in stage_specs(cfg)]; format_status(cfg); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr
