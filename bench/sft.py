"""SFT throughput: alignpipe's SFT stage vs a plain TRL SFTTrainer, side by side in one run.

Same model (a tiny Llama built from a config + the locally trained tokenizer), same data, same batch
size, sequence length, steps, learning rate and precision (fp32), one torch thread each. Each trainer
runs in its own subprocess so peak memory (ru_maxrss of that process) is its own; runs alternate
(A B A B) so machine noise hits both. Tokens are counted the same way for both: the non-pad tokens
of the rows each one trained on.

Then real variable-length data (gsm8k: openai/grade-school-math, MIT; the train split as JSONL with
question/answer, read from ``$ALIGNPIPE_DATA_DIR/gsm8k/train.jsonl``, skipped when absent) through
alignpipe with packing on vs off: examples/s and tokens/s for one pass over the same examples.

    python bench/sft.py [--steps 60] [--repeats 2] [--hidden 128] [--gsm8k-examples 512]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GSM8K = Path(os.path.expandvars("$ALIGNPIPE_DATA_DIR/gsm8k/train.jsonl"))


def _base_config(args, out: str) -> dict:
    return {
        "run_name": "bench", "output_root": out,
        "model": {"source": "tiny", "tiny": {"hidden_size": args.hidden, "num_layers": 2, "num_heads": 4,
                                              "num_kv_heads": 2, "intermediate_size": args.hidden * 2,
                                              "vocab_size": 512}},
        "logging": {"progress_bar": False},
        "sft": {"data": {"path": "data/demo/sft.jsonl"}, "eval_fraction": 0.0, "max_length": 128,
                "train": {"max_steps": args.steps, "per_device_batch_size": 8, "learning_rate": 1e-3,
                          "warmup_ratio": 0.0, "lr_scheduler": "constant", "precision": "fp32",
                          "save_steps": 10_000, "num_threads": 1, "max_grad_norm": 1.0}},
    }


def run_alignpipe(args) -> dict:
    import torch

    from pipeline.config import config_from_dict
    from stages import engine as engine_mod
    from stages import sft

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        data = _base_config(args, out)
        if args.packing is not None:
            data["sft"]["packing"] = args.packing
            data["sft"]["data"] = {"path": str(GSM8K), "columns": {"prompt": "question", "completion": "answer"},
                                   "max_records": args.gsm8k_examples}
            data["sft"]["max_length"] = 512
            data["sft"]["train"].pop("max_steps")
            data["sft"]["train"]["epochs"] = 1
        cfg = config_from_dict(data)
        timing = {}
        original_fit = engine_mod.Engine.fit

        def timed_fit(self):
            tokens = sum(len(r["input_ids"]) for r in self.items)
            per_epoch_rows = len(self.items)
            start = time.perf_counter()
            result = original_fit(self)
            timing["train_s"] = time.perf_counter() - start
            rows_trained = result.global_step * self.train.per_device_batch_size * self.accum
            timing["tokens"] = tokens / per_epoch_rows * rows_trained if args.packing is None else tokens
            timing["rows"] = per_epoch_rows
            return result

        engine_mod.Engine.fit = timed_fit
        sft.run(cfg)
    return timing


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from data.formats import load_examples
    from pipeline.config import config_from_dict
    from pipeline.models import load_model, load_tokenizer, prepare_base

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        cfg = config_from_dict(_base_config(args, out))
        base = prepare_base(cfg.model)
        tok = load_tokenizer(base, cfg.model)
        model = load_model(base, cfg.model, tok)
        examples, _ = load_examples(cfg.sft.data, "sft")
        # prompt/completion conversational format: TRL masks the prompt (completion-only loss)
        rows = [{"prompt": ex.messages[:-1], "completion": ex.messages[-1:]} for ex in examples]
        dataset = Dataset.from_list(rows)
        sft_args = SFTConfig(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=1e-3,
            lr_scheduler_type="constant", warmup_steps=0, max_length=128, bf16=False, fp16=False,
            gradient_checkpointing=False, report_to=[], logging_steps=10_000, save_strategy="no",
            use_cpu=True, dataloader_num_workers=0, max_grad_norm=1.0, packing=False, seed=0,
        )
        trainer = SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tok)
        lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
    rows_trained = args.steps * 8
    return {"train_s": train_s, "tokens": sum(lengths) / len(lengths) * rows_trained, "rows": len(lengths)}


def child(args) -> None:
    result = run_trl(args) if args.which == "trl" else run_alignpipe(args)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args, which: str, packing: bool | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--steps", str(args.steps), "--hidden", str(args.hidden),
           "--gsm8k-examples", str(args.gsm8k_examples)]
    if packing is not None:
        cmd += ["--packing", "on" if packing else "off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{which} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--gsm8k-examples", type=int, default=512)
    parser.add_argument("--child", choices=["alignpipe", "trl"], dest="which")
    parser.add_argument("--packing", choices=["on", "off"])
    args = parser.parse_args()
    if args.which:
        args.packing = None if args.packing is None else args.packing == "on"
        child(args)
        return
    runs: dict[str, list[dict]] = {"alignpipe": [], "trl": []}
    for _ in range(args.repeats):
        for which in ("alignpipe", "trl"):
            runs[which].append(spawn(args, which))
    tps = {k: sorted(r["tokens"] / r["train_s"] for r in v)[len(v) // 2] for k, v in runs.items()}
    mem = {k: max(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
    print(f"\nSFT, tiny Llama hidden {args.hidden} x 2 layers, batch 8, max_length 128, {args.steps} steps, "
          f"fp32, 1 thread, median of {args.repeats}")
    print(f"{'trainer':<12}{'tokens/s':>12}{'peak RSS MiB':>15}")
    for k in ("alignpipe", "trl"):
        print(f"{k:<12}{tps[k]:>12,.0f}{mem[k]:>15,.0f}")
    print(f"ratio alignpipe/trl: tokens/s {tps['alignpipe'] / tps['trl']:.2f}x, "
          f"peak memory {mem['alignpipe'] / mem['trl']:.2f}x")
    if not GSM8K.exists():
        print(f"\ngsm8k packing run skipped: {GSM8K} not found (set ALIGNPIPE_DATA_DIR)")
    else:
        packed = {p: spawn(args, "alignpipe", packing=p) for p in (False, True)}
        print(f"\ngsm8k ({args.gsm8k_examples} examples, max_length 512, one epoch, batch 8), alignpipe:")
        for p, r in packed.items():
            print(f"packing {'on ' if p else 'off'}: rows {r['rows']:>4}, {r['train_s']:6.1f} s, "
                  f"{args.gsm8k_examples / r['train_s']:6.1f} examples/s, {r['tokens'] / r['train_s']:8,.0f} tokens/s")
        print(f"packing speed-up (examples/s): {packed[False]['train_s'] / packed[True]['train_s']:.2f}x")


if __name__ == "__main__":
    main()
