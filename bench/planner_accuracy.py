"""Memory planner accuracy: pipeline/memory.py's per-stage estimate against the peak each stage process
recorded in its manifest (``peak_memory``; pipeline/stage.py), on CPU.

    .venv/bin/python bench/planner_accuracy.py                      # configs/tiny.yaml (~1-2 min)
    .venv/bin/python bench/planner_accuracy.py configs/demo.yaml    # the SmolLM2 demo (~15 min on 2 cores)
    .venv/bin/python bench/planner_accuracy.py configs/demo.yaml --run-dir outputs/<run>   # an existing run
    .venv/bin/python bench/planner_accuracy.py --heap               # CPU_HEAP_RETENTION's measurement

Measured = the stage process's peak RSS (ru_maxrss: python, libraries, models, activations, all of it); on
CUDA, bench/gpu_check.py compares torch's max allocated with the plan less its ``runtime`` (the CUDA context
is outside torch's allocator). Two estimates per stage: the plan of the run's config, which sizes activations at
the longest sequence the config allows (``max_length``, prompt + new tokens), and the plan of the same run
with those lengths set to the longest row its data actually holds (a run identical to it: no row is cut
either way), which is what the stage met. The error and the verdict are the second's; the ``implied runtime``
column is measured minus the second plan's model terms, which is how ``CPU_RUNTIME_BYTES`` was fitted on
configs/tiny.yaml. The base model is prepared first, so that building or converting it is not counted in the
SFT stage. Target: within 25% for every stage. Writes outputs/planner-accuracy/<run name>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_check import MIB, STAGES, planner_plan, stage_figures  # noqa: E402

TARGET = 0.25


def longest_rows(run_dir: Path) -> list[str]:
    """Overrides that set each stage's length limits to the longest row its data holds, tokenized as the stage
    does (the run's tokenizer, chat template and system prompt)."""
    from transformers import AutoTokenizer

    from data.formats import load_examples
    from pipeline.config import config_from_dict
    from stages.chat import prompt_ids, tokenize_sft
    from stages.preferences import encode_pairs

    resolved = run_dir / "config.resolved.json"
    cfg = config_from_dict(json.loads(resolved.read_text()), str(resolved))
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "sft" / "model"))
    system = cfg.chat.system_prompt
    out = []
    if not cfg.sft.packing:  # packed rows fill max_length
        examples, _ = load_examples(cfg.sft.data, "sft")
        sft = max(len(tokenize_sft(tokenizer, ex.messages, cfg.sft.max_length, system)["input_ids"]) for ex in examples)
        out.append(f"sft.max_length={max(sft, 9)}")
    pairs, _ = load_examples(cfg.rm.data, "preference")
    rows, _ = encode_pairs(tokenizer, pairs, cfg.rm.max_length, system)
    out.append(f"rm.max_length={max(9, *(max(len(r.chosen), len(r.rejected)) for r in rows))}")
    prompts, _ = load_examples(cfg.ppo.data, "prompt")
    longest = max(len(prompt_ids(tokenizer, ex.prompt, system)) for ex in prompts)
    out.append(f"ppo.max_prompt_length={min(longest, cfg.ppo.max_prompt_length)}")
    return out


def run_stages(config: str, overrides: list[str]) -> tuple[Path, int]:
    """Run the config's sft -> rm -> ppo afresh under outputs/planner-accuracy/; -> (run folder, exit status)."""
    from pipeline.config import load_config
    from pipeline.models import prepare_base

    root = REPO / "outputs" / "planner-accuracy"
    overrides = [f"run_name=planner-accuracy-{Path(config).stem}", f"output_root={root}",
                 "logging.progress_bar=false", *overrides]
    cfg = load_config(REPO / config, overrides)
    prepare_base(cfg.model)
    cmd = [sys.executable, "-m", "pipeline", "run", config, "--force", "--no-report", "--stages", *STAGES, *overrides]
    return root / cfg.run_name, subprocess.run(cmd, cwd=REPO).returncode


def compare(run_dir: Path) -> tuple[dict[str, Any], bool]:
    """Per stage: measured peak RSS, the two plans, the error and the implied runtime; and whether all are within
    the target."""
    at_data = longest_rows(run_dir)
    rows, ok = {}, True
    for stage in STAGES:
        f = stage_figures(run_dir, stage)
        peak = (f.get("peak_memory") or {}).get("rss_peak_bytes")
        try:
            plan, data_plan = planner_plan(run_dir, stage), planner_plan(run_dir, stage, at_data)
        except Exception as exc:  # noqa: BLE001 - a planner error is a finding, shown in the table
            plan = data_plan = None
            f["planner_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if plan is None or data_plan is None or not peak:
            rows[stage], ok = f, False
            continue
        runtime = sum(r.total for r in data_plan.roles if r.role == "runtime")
        f.update(rss_peak_bytes=peak, plan_bytes=plan.total_bytes, plan_at_data_bytes=data_plan.total_bytes,
                 data_lengths=at_data, error=round((data_plan.total_bytes - peak) / peak, 3),
                 implied_runtime_bytes=peak - (data_plan.total_bytes - runtime),
                 roles={r.role: r.total for r in data_plan.roles})
        ok &= abs(f["error"]) <= TARGET
        rows[stage] = f
    return rows, ok


def print_table(config: str, rows: dict[str, Any]) -> None:
    print(f"\nplanner accuracy, {config}; measured = the stage process's peak RSS; at the data's longest rows: "
          f"{', '.join(next((f['data_lengths'] for f in rows.values() if 'data_lengths' in f), []))}")
    print(f"{'stage':6} {'peak MiB':>9} {'plan MiB':>9} {'plan at data':>13} {'error':>7} "
          f"{'implied runtime':>16}  verdict")
    for stage, f in rows.items():
        if "error" not in f:
            print(f"{stage:6} {'-':>9} {'-':>9} {'-':>13}   (status {f.get('status')}; {f.get('planner_error', '')})")
            continue
        print(f"{stage:6} {f['rss_peak_bytes'] / MIB:9,.0f} {f['plan_bytes'] / MIB:9,.0f} "
              f"{f['plan_at_data_bytes'] / MIB:13,.0f} {f['error']:+7.0%} {f['implied_runtime_bytes'] / MIB:16,.0f}  "
              f"{'within' if abs(f['error']) <= TARGET else 'OUTSIDE'} {TARGET:.0%}")


# ------------------------------------------------------------------------------------- CPU heap retention
HEAP_SHAPES = [  # SmolLM2-135M's layer shape, LoRA on every projection, micro-batch 8 x 96 tokens
    dict(layers=30, vocab=49152, lora=1), dict(layers=8, vocab=4096, lora=1), dict(layers=8, vocab=4096, lora=0)]


def heap_probe(layers: int, vocab: int, lora: int) -> dict[str, float]:
    """In this process: peak RSS growth of 6 training steps of a random Llama, after the first and the last, next
    to the planner's activations (+ gradients and Adam states) for the same micro-batch."""
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).train()
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    ids = torch.randint(1, vocab, (8, 96))
    before, peaks = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, []
    for _ in range(6):
        model(input_ids=ids, labels=ids).loss.backward()  # no padding mask, like SFT's collate
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    from pipeline.config import TuningConfig
    from pipeline.memory import CPU_HEAP_RETENTION, ModelDims, _Knobs, _train_activations

    dims = ModelDims(576, layers, 1536, vocab, 9, 3, 64, tie_embeddings=True)
    knobs = _Knobs(0, False, False, False, 4, 4, TuningConfig(method="lora" if lora else "full"), 8, False, cpu=True)
    act = _train_activations(dims, knobs, 96, 8, lm_head=True, padded=False)
    states = 3 * 4 * sum(p.numel() for p in trained)  # fp32 gradients + Adam's m and v
    planned = act.total + states + max(0, int(CPU_HEAP_RETENTION * act.heap) - states)
    return {"first_step": peaks[0], "steady": peaks[-1], "activations": act.total, "heap_activations": act.heap,
            "gradients_and_adam": states, "retention": (peaks[-1] - act.total) / act.heap,
            "steady_over_plan": peaks[-1] / planned}


def heap_report() -> int:
    """Each shape in a fresh process; prints the retention each implies (CPU_HEAP_RETENTION's source)."""
    print("steady = peak RSS growth after 6 steps; retention = (steady - activations) / activations in heap-sized "
          "blocks; plan = activations + gradients and Adam + the heap slack they do not fill (CPU_HEAP_RETENTION)")
    for shape in HEAP_SHAPES:
        code = (f"import json, sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'bench')!r}]\n"
                f"from planner_accuracy import heap_probe\nprint(json.dumps(heap_probe(**{shape!r})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0:
            print(f"{shape}: failed\n{out.stderr[-1500:]}")
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{shape}: first step {r['first_step'] / MIB:,.0f} MiB, steady {r['steady'] / MIB:,.0f} MiB; planned "
              f"activations {r['activations'] / MIB:,.0f} MiB ({r['heap_activations'] / MIB:,.0f} in heap-sized "
              f"blocks), gradients + Adam {r['gradients_and_adam'] / MIB:,.0f} MiB; retention {r['retention']:.2f}, "
              f"steady / plan {r['steady_over_plan']:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default="configs/tiny.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    ap.add_argument("--run-dir", help="read the peaks of an existing, complete run folder (e.g. the demo run of "
                                      "bench/quality.py) instead of running the stages again")
    ap.add_argument("--heap", action="store_true", help="measure glibc's heap retention (CPU_HEAP_RETENTION)")
    args = ap.parse_args(argv)
    if args.heap:
        return heap_report()
    t0 = time.time()
    run_dir, code = (Path(args.run_dir).resolve(), 0) if args.run_dir else run_stages(args.config, args.overrides)
    rows, ok = compare(run_dir)
    print_table(args.config, rows)
    print(f"({time.time() - t0:.0f} s, exit {code})")
    root = REPO / "outputs" / "planner-accuracy"
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{run_dir.name}.json"
    out.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "run_dir": str(run_dir),
                               "stages": rows}, indent=2, default=str))
    print(f"written: {out}")
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
