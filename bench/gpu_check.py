"""The GPU check (started by bench/gpu_check.sh; README "GPU check").

Steps, each named in the output and in the exit message when it fails:

1. ``preflight``: library versions; CUDA present, bf16 supported and a bf16 matmul close to fp64, an nccl
   process group (one rank) that all-reduces, DeepSpeed's accelerator is cuda. Any failure stops here
   (exit 1): the rest would only measure a broken set-up.
2. ``tests``: ``pytest -m gpu`` (tuning methods incl. QLoRA, bf16 autocast paths, SFT/RM/PPO on tiny models).
   On the GPU a skipped test counts as a failure (a missing bitsandbytes must not pass silently).
3. ``run:<model>/<mode>``: ``python -m pipeline run configs/tiny.yaml`` (sft -> rm -> ppo) on random Llamas of
   SmolLM2-135M's and of ~1B parameters' shape (``model.tiny.*`` overrides), bf16 autocast, with LoRA, full
   fine-tuning, and full fine-tuning under DeepSpeed ZeRO-2 on one rank (torchrun, nccl). Per stage: tokens/s
   (SFT, RM), episodes/s, response tokens/s and the generate/forward/score/update split (PPO), wall time, and
   the peak memory the stage process recorded in its manifest (``peak_memory``: torch's max allocated on
   CUDA, the peak RSS on CPU) next to pipeline/memory.py's estimate for the same run.

Every process the check starts shares one empty TORCH_EXTENSIONS_DIR; an op JIT-compiled into it (DeepSpeed's,
under DS_BUILD_OPS=0) is a failure: it needs a compiler a fresh machine may lack, and a minute or more.

Writes ``gpu_check.json`` and ``gpu_check.md`` (plus ``pytest.log``, ``runs.log``) into ``--out``. Runs that the
time budget (``--budget-s``) leaves no room for are listed as SKIPPED (time budget), never dropped.

``--dry-run``: the same steps on CPU with tiny sizes (``GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MIB = 1024**2

# Body shapes (the embedding is sized by the tiny tokenizer trained locally, see pipeline/models.py).
GPU_MODELS: dict[str, dict[str, int]] = {
    # SmolLM2-135M: hidden 576, 30 layers, 9 heads / 3 kv heads, MLP 1536 (~106M without its 49k vocab)
    "smollm2-135m": dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                         vocab_size=4096),
    # Llama-3.2-1B's body: hidden 2048, 16 layers, 32 / 8 heads, MLP 8192 (~0.99B with a 4k vocab)
    "llama-1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
                     vocab_size=4096),
}
DRY_MODELS: dict[str, dict[str, int]] = {  # one size: the shared 2-core CPU fits three pipelines in the 3 minutes
    "tiny": {},  # configs/tiny.yaml as it is
}
STAGES = ("sft", "rm", "ppo")
ZERO2 = "configs/deepspeed/zero2.json"
# Time budgets (s): the whole check (``--budget-s``), and what a run needs before any has finished: four python
# processes (orchestrator, sft, rm, ppo) importing torch, transformers, peft and DeepSpeed, on a GPU each
# initialising CUDA too. Measured warm on the 2-core CPU (dry run, 2026-12-07): runs of 18-31 s, 88 s in all;
# a cold machine pays its first imports in the preflight, which imports everything first. Later runs need
# 1.25 x the slowest so far.
BUDGET_S = {True: 175.0, False: 440.0}
FIRST_RUN_S = {True: 45.0, False: 90.0}


def mode_overrides(mode: str) -> list[str]:
    method = "lora" if mode == "lora" else "full"
    out = [f"{s}.tuning.method={method}" for s in STAGES]
    if mode == "zero2":
        out += [f"sft.train.deepspeed={ZERO2}", f"rm.train.deepspeed={ZERO2}", f"ppo.train.deepspeed={ZERO2}",
                "launch.launcher=torchrun", "launch.nproc_per_node=1"]
    return out


def size_overrides(dry: bool) -> list[str]:
    if dry:
        return ["sft.train.max_steps=6", "rm.train.max_steps=6", "ppo.total_episodes=32", "sft.train.save_steps=100",
                "rm.train.save_steps=100", "ppo.train.save_steps=100"]
    return ["sft.train.max_steps=12", "rm.train.max_steps=12", "sft.train.per_device_batch_size=16",
            "rm.train.per_device_batch_size=16", "ppo.total_episodes=64", "ppo.max_new_tokens=32",
            "sft.train.save_steps=1000", "rm.train.save_steps=1000", "ppo.train.save_steps=1000",
            "sft.train.precision=bf16", "rm.train.precision=bf16", "ppo.train.precision=bf16"]


class StepFailed(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ preflight
def preflight(dry: bool) -> dict[str, Any]:
    import importlib

    info: dict[str, Any] = {"python": sys.version.split()[0], "versions": {}}
    for name in ("torch", "transformers", "peft", "accelerate", "pydantic", "deepspeed", "bitsandbytes", "trl"):
        try:
            info["versions"][name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - reported, and fatal below where the check needs it
            info["versions"][name] = f"IMPORT FAILED: {type(exc).__name__}: {str(exc)[:200]}"
    for needed in ("torch", "transformers", "peft", "pydantic", "deepspeed"):
        if str(info["versions"][needed]).startswith("IMPORT FAILED"):
            raise StepFailed(f"preflight:import {needed}: {info['versions'][needed]}")
    import torch

    if not dry:
        if not torch.cuda.is_available():
            raise StepFailed("preflight:cuda: torch.cuda.is_available() is False")
        info["device"] = torch.cuda.get_device_name(0)
        info["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 1024**3, 1)
        info["cuda"] = torch.version.cuda
        if not torch.cuda.is_bf16_supported():
            raise StepFailed("preflight:bf16: torch.cuda.is_bf16_supported() is False")
        a, b = torch.randn(512, 512, device="cuda"), torch.randn(512, 512, device="cuda")
        ref = a.double() @ b.double()
        rel = float((((a.bfloat16() @ b.bfloat16()).double() - ref).norm() / ref.norm()).item())
        info["bf16_matmul_rel_err"] = rel
        if not rel < 2e-2:
            raise StepFailed(f"preflight:bf16: bf16 matmul relative error {rel:.3g} (expected < 2e-2)")
        from deepspeed.accelerator import get_accelerator

        info["deepspeed_accelerator"] = get_accelerator().device_name()
        if info["deepspeed_accelerator"] != "cuda":
            raise StepFailed(f"preflight:deepspeed: accelerator is {info['deepspeed_accelerator']!r}, not cuda")
    backend = "gloo" if dry else "nccl"
    code = (
        "import os, torch, torch.distributed as d\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=os.environ['P'])\n"
        f"d.init_process_group('{backend}', rank=0, world_size=1)\n"
        f"t = torch.ones(4, device='{'cpu' if dry else 'cuda'}')\n"
        "d.all_reduce(t); assert t.sum().item() == 4, t\n"
        "d.destroy_process_group(); print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "P": str(_free_port())},
                          capture_output=True, text=True, timeout=120)
    info[f"{backend}_allreduce"] = proc.returncode == 0
    if proc.returncode != 0:
        raise StepFailed(f"preflight:{backend}: one-rank all_reduce failed: {(proc.stderr or proc.stdout)[-800:]}")
    return info


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------- tests
def run_tests(dry: bool, work: Path, out: Path, timeout: float) -> dict[str, Any]:
    junit = work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "-o", "addopts=-ra"]
    if dry:  # the CPU is small: a representative subset (the full set runs on the GPU)
        cmd += ["-k", os.environ.get("GPU_CHECK_DRY_TESTS", "bf16 or merged_lora")]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text, code = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {timeout:.0f} s", -1
    (out / "pytest.log").write_text(text if isinstance(text, str) else text.decode(errors="replace"))
    res: dict[str, Any] = {"command": " ".join(cmd[2:]), "returncode": code, "wall_s": round(time.time() - t0, 1)}
    if junit.exists():
        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            res[key] = int(suite.get(key, 0))
        res["skipped_names"] = [c.get("name") for c in suite.iter("testcase") if c.find("skipped") is not None]
        res["failed_names"] = [c.get("name") for c in suite.iter("testcase")
                               if c.find("failure") is not None or c.find("error") is not None]
    return res


# ------------------------------------------------------------------------------------ pipeline runs
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _median_after_first(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    if len(values) > 1:
        values = values[1:]  # the first logged step carries warm-up (allocator, kernels, compile)
    return statistics.median(values) if values else None


def planner_plan(run_dir: Path, stage: str, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """pipeline/memory.py's plan for ``stage`` of the run in ``run_dir`` (its resolved config, plus ``overrides``),
    with the tiny model's vocabulary as built (the tokenizer trained locally may hold fewer than asked); None
    without a resolved config."""
    from pipeline import memory
    from pipeline.config import apply_overrides, config_from_dict

    resolved = run_dir / "config.resolved.json"
    if not resolved.exists():
        return None
    data = json.loads(resolved.read_text())
    cfg = config_from_dict(apply_overrides(data, list(overrides)) if overrides else data, str(resolved))
    built = run_dir / "sft" / "model" / "config.json"
    if cfg.model.source == "tiny" and built.exists():
        vocab = json.loads(built.read_text()).get("vocab_size")
        if vocab:
            tiny = cfg.model.tiny.model_copy(update={"vocab_size": int(vocab)})
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"tiny": tiny})})
    return memory.estimate(cfg, stage)


def comparable_estimate(plan: Any, peak_kind: str) -> int:
    """The plan's bytes that ``peak_kind`` measures: all of them for a peak RSS on CPU; on CUDA, torch's max
    allocated leaves out the CUDA context (the plan's ``runtime``)."""
    if peak_kind == "cuda_max_allocated":
        return plan.total_bytes - sum(r.total for r in plan.roles if r.role == "runtime")
    return plan.total_bytes


def measured_peak(manifest: dict[str, Any]) -> tuple[int | None, str]:
    """(bytes, what) of a stage's peak: CUDA max allocated where recorded, else the process's peak RSS."""
    peak = manifest.get("peak_memory") or {}
    if peak.get("cuda_max_allocated_bytes") is not None:
        return int(peak["cuda_max_allocated_bytes"]), "cuda_max_allocated"
    if peak.get("rss_peak_bytes") is not None:
        return int(peak["rss_peak_bytes"]), "rss_peak"
    return None, "none"


def stage_figures(run_dir: Path, stage: str) -> dict[str, Any]:
    sdir = run_dir / stage
    manifest_path = sdir / "manifest.json"
    if not manifest_path.exists():
        return {"status": "not started"}
    manifest = json.loads(manifest_path.read_text())
    rows = _read_jsonl(sdir / "metrics.jsonl")
    fig: dict[str, Any] = {"status": manifest.get("status"), "wall_time_s": manifest.get("wall_time_s")}
    if manifest.get("error"):
        fig["error"] = manifest["error"][-600:]
    if stage in ("sft", "rm"):
        fig["tokens_per_s"] = _median_after_first([r.get("tokens_per_s") for r in rows if "tokens_per_s" in r])
    else:
        metrics = manifest.get("metrics") or {}
        fig["episodes_per_s"] = metrics.get("episodes_per_s_mean")
        fig["response_tokens_per_s"] = metrics.get("response_tokens_per_s_mean")
        split = {k: sum(r.get(k, 0.0) or 0.0 for r in rows)
                 for k in ("time_generate", "time_forward", "time_score", "time_update")}
        total = sum(split.values())
        fig["time_split"] = {k.removeprefix("time_"): round(v / total, 3) for k, v in split.items()} if total else {}
    peak, what = measured_peak(manifest)
    fig["peak_bytes"], fig["peak_kind"] = peak, what
    fig["peak_memory"] = manifest.get("peak_memory")
    try:
        plan = planner_plan(run_dir, stage)
        est = None if plan is None else comparable_estimate(plan, what)
    except Exception as exc:  # noqa: BLE001 - a planner error is a finding, recorded next to the figure
        est, fig["planner_error"] = None, f"{type(exc).__name__}: {exc}"[:300]
    fig["planner_estimate_bytes"] = est
    fig["measured_over_estimate"] = round(peak / est, 3) if peak and est else None
    return fig


def fresh_extensions_dir(work: Path) -> Path:
    """An empty TORCH_EXTENSIONS_DIR for every process the check starts: where torch puts any C++/CUDA op it
    JIT-builds (DeepSpeed's ops under DS_BUILD_OPS=0), so ``compiled_ops`` can tell whether anything was built."""
    folder = work / "torch_extensions"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)
    return folder


def compiled_ops(folder: Path) -> list[str]:
    """The ops built into ``folder`` (``<python>_<device>/<op>``). None should be: each build needs a compiler
    (and CUDA headers on a GPU) that a fresh machine may lack, and about a minute."""
    return sorted(f"{d.name}/{op.name}" for d in folder.iterdir() if d.is_dir() for op in d.iterdir())


def run_pipeline(name: str, overrides: list[str], work: Path, timeout: float) -> dict[str, Any]:
    run_dir = work / "outputs" / name
    cmd = [sys.executable, "-m", "pipeline", "run", "configs/tiny.yaml", "--force", "--no-report", f"run_name={name}",
           f"output_root={work / 'outputs'}", "logging.progress_bar=false", *overrides]
    log = work / f"{name.replace('/', '_')}.log"
    t0 = time.time()
    try:
        with open(log, "w") as fh:
            code = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code = -1
        with open(log, "a") as fh:
            fh.write(f"\nTIMEOUT after {timeout:.0f} s (gpu_check budget)\n")
    res: dict[str, Any] = {"overrides": overrides, "returncode": code, "wall_s": round(time.time() - t0, 1),
                           "log": str(log), "stages": {s: stage_figures(run_dir, s) for s in STAGES}}
    failed = [s for s in STAGES if res["stages"][s].get("status") != "complete"]
    res["failed_stage"] = failed[0] if failed else None
    return res


# -------------------------------------------------------------------------------------------- report
def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:,.0f}" if n >= 10 * MIB else f"{n / MIB:.1f}"


def _num(x: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(result: dict[str, Any]) -> str:
    pf = result.get("preflight", {})
    lines = [f"# GPU check ({'DRY RUN on CPU' if result['dry_run'] else pf.get('device', '?')})", "",
             f"Verdict: **{'PASS' if not result['failures'] else 'FAIL'}**" +
             ("" if not result["failures"] else " - " + "; ".join(result["failures"])), "",
             f"Wall time {result['wall_s']:.0f} s. Python {pf.get('python')}; " +
             ", ".join(f"{k} {v}" for k, v in pf.get("versions", {}).items()), "",
             "Ops compiled at first use (TORCH_EXTENSIONS_DIR): "
             f"{', '.join(result.get('compiled_ops') or []) or 'none'}", ""]
    tests = result.get("tests")
    if tests:
        lines += [f"Tests (`pytest {tests['command']}`): {tests.get('tests', '?')} run, {tests.get('failures', '?')} "
                  f"failed, {tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped, "
                  f"{tests['wall_s']} s" + (f"; failed: {', '.join(tests['failed_names'])}"
                                             if tests.get("failed_names") else ""), ""]
    lines += ["| run | stage | status | s | tokens/s | episodes/s | resp tok/s | PPO split gen/fwd/score/upd "
              "| peak MiB | planner MiB | peak/planner |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in result.get("runs", {}).items():
        if run.get("skipped"):
            lines.append(f"| {name} | - | SKIPPED ({run['skipped']}) | | | | | | | | |")
            continue
        for stage, f in run["stages"].items():
            split = f.get("time_split") or {}
            split_s = "/".join(f"{split.get(k, 0):.0%}" for k in ("generate", "forward", "score", "update")) \
                if split else "-"
            lines.append(
                f"| {name} | {stage} | {f.get('status')} | {_num(f.get('wall_time_s'), '{:.0f}')} | "
                f"{_num(f.get('tokens_per_s'))} | {_num(f.get('episodes_per_s'), '{:.2f}')} | "
                f"{_num(f.get('response_tokens_per_s'))} | {split_s} | {_mib(f.get('peak_bytes'))} | "
                f"{_mib(f.get('planner_estimate_bytes'))} | {_num(f.get('measured_over_estimate'), '{:.2f}')} |")
    kind = "CUDA max allocated" if not result["dry_run"] else "the process's peak RSS (CPU)"
    lines += ["", f"Peak = {kind}, rank 0, recorded by the stage process in its manifest (`peak_memory`).",
              "Planner = pipeline/memory.py `estimate(cfg, stage).total_bytes` for the same resolved config "
              "(on CUDA less its `runtime`, the CUDA context, which torch's allocator does not count)."]
    return "\n".join(lines) + "\n"


def tests_step(dry: bool, work: Path, out: Path, result: dict[str, Any]) -> None:
    """``pytest -m gpu`` into ``result["tests"]``; a failure, or on the GPU a skip, into ``result["failures"]``."""
    print("[gpu_check] tests: pytest -m gpu", flush=True)
    tests = run_tests(dry, work, out, timeout=60 if dry else 150)
    result["tests"] = tests
    if tests["returncode"] != 0:
        result["failures"].append(f"tests: pytest -m gpu exit {tests['returncode']} "
                                  f"(failed: {', '.join(tests.get('failed_names', [])) or 'see pytest.log'})")
    elif not dry and tests.get("skipped"):
        result["failures"].append(f"tests: {tests['skipped']} skipped on the GPU: {tests['skipped_names']}")
    print(f"[gpu_check] tests: {json.dumps({k: v for k, v in tests.items() if k != 'command'})}", flush=True)


def room_for_run(left: float, finished: list[float], dry: bool) -> bool:
    """Whether ``left`` seconds cover one more run: 1.25 x the slowest finished run, or ``FIRST_RUN_S`` before any
    has finished. A run started without room would time out and fail; one left out is listed as SKIPPED."""
    return left >= (1.25 * max(finished) if finished else FIRST_RUN_S[dry])


def run_all(dry: bool, runs: str, work: Path, result: dict[str, Any], deadline: float) -> None:
    """The model x mode pipelines (``runs``: comma-separated names, default all) while the budget lasts, into
    ``result["runs"]``; failures into ``result["failures"]``. In a dry run a run left out for time is a failure
    too: on a CPU with tiny sizes nothing should need more than the budget."""
    models = DRY_MODELS if dry else GPU_MODELS
    wanted = {r.strip() for r in runs.split(",") if r.strip()}
    plan = [(m, mode) for m in models for mode in ("lora", "full", "zero2") if not wanted or f"{m}/{mode}" in wanted]
    finished: list[float] = []
    for model, mode in plan:
        name = f"{model}-{mode}"
        left = deadline - time.time()
        if not room_for_run(left, finished, dry):
            result["runs"][name] = {"skipped": f"time budget: {left:.0f} s left, not enough for a run"}
            print(f"[gpu_check] SKIPPED {name}: time budget ({left:.0f} s left)", flush=True)
            if dry:
                result["failures"].append(f"run:{name}: skipped, {left:.0f} s of the time budget left "
                                          "(GPU_CHECK_BUDGET_S raises it)")
            continue
        overrides = [f"model.tiny.{k}={v}" for k, v in models[model].items()]
        overrides += mode_overrides(mode) + size_overrides(dry)
        print(f"[gpu_check] run {name} ({left:.0f} s left)", flush=True)
        run = run_pipeline(name, overrides, work, timeout=left)
        result["runs"][name] = run
        finished.append(run["wall_s"])
        if run["returncode"] != 0 or run["failed_stage"]:
            stage = run["failed_stage"] or "?"
            err = run["stages"].get(stage, {}).get("error", f"exit {run['returncode']}, see runs.log")
            result["failures"].append(f"run:{name}/{stage}: {err}")
        brief = {s: {k: f.get(k) for k in ("status", "wall_time_s", "tokens_per_s", "episodes_per_s",
                                             "peak_bytes", "planner_estimate_bytes")}
                 for s, f in run["stages"].items()}
        print(f"[gpu_check] {name}: exit {run['returncode']} in {run['wall_s']} s {json.dumps(brief)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", 0) or 0),
                    help="stop starting runs after this many seconds (default: 175 dry, 440 on the GPU)")
    ap.add_argument("--runs", default=os.environ.get("GPU_CHECK_RUNS", ""),
                    help="comma-separated model/mode names to run (default: all)")
    ap.add_argument("--no-tests", action="store_true")
    args = ap.parse_args(argv)
    dry = args.dry_run
    budget = args.budget_s or BUDGET_S[dry]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/alignpipe-gpu-check"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result: dict[str, Any] = {"dry_run": dry, "budget_s": budget, "failures": [], "runs": {}}
    extensions = fresh_extensions_dir(work)

    def finish() -> int:
        result["wall_s"] = round(time.time() - t0, 1)
        result["compiled_ops"] = compiled_ops(extensions)
        if result["compiled_ops"]:
            result["failures"].append(f"op builds: {', '.join(result['compiled_ops'])} compiled at first use "
                                      "(needs a compiler; nothing the check runs should build one)")
        (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "gpu_check.md").write_text(markdown(result))
        logs = sorted(work.glob("*.log"))
        with open(out / "runs.log", "w") as fh:
            for log in logs:
                text = log.read_text(errors="replace")
                fh.write(f"===== {log.name} (last 60000 chars)\n{text[-60000:]}\n")
        print(markdown(result))
        if result["failures"]:
            print("GPU CHECK FAILED: " + "; ".join(result["failures"]), file=sys.stderr)
            return 1
        return 0

    print(f"[gpu_check] preflight ({'dry run, CPU' if dry else 'CUDA'})", flush=True)
    try:
        result["preflight"] = preflight(dry)
    except StepFailed as exc:
        result["failures"].append(str(exc))
        return finish()
    print(f"[gpu_check] preflight ok: {json.dumps(result['preflight'])}", flush=True)

    if not args.no_tests:
        tests_step(dry, work, out, result)

    run_all(dry, args.runs, work, result, deadline=t0 + budget)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
