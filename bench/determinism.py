"""The price of ``determinism: true`` on this machine: training steps with torch's deterministic mode on and off.

One process trains three copies of one Llama (same initial weights, same batches, AdamW) and alternates
between them in short blocks, so machine noise (a shared CPU) hits every arm alike:

- ``off``: torch's defaults (``determinism: false``);
- ``on``: what ``stages.training.start_reproducibly`` sets for ``determinism: true`` (deterministic
  algorithms, warn-only; no filling of uninitialised memory);
- ``on+fill``: the same with torch's default filling of every new uninitialised tensor (not used by the
  project; shows what that filling would cost).

It prints, for each arm, the median seconds of a block (wall and process CPU time), the ratios of the medians
to ``off``, and whether each arm ended with the same bits as ``off`` (on a CPU it should: the mode changes a
kernel only where a non-deterministic variant exists). The default shape is SmolLM2-135M's (hidden 576, 9 / 3
heads, vocab 49,152) with 4 layers, batch 8 x 96 tokens (the demo's ``sft.max_length``).

    python bench/determinism.py [--threads 2] [--rounds 8] [--steps-per-block 2] [--layers 4] [--vocab 49152]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.training import start_reproducibly  # noqa: E402

ARMS = ("off", "on", "on+fill")


def set_arm(arm: str) -> None:
    if arm == "off":
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = True  # torch's default (inactive when off)
        return
    start_reproducibly(0, True)
    torch.utils.deterministic.fill_uninitialized_memory = arm == "on+fill"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps-per-block", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=96)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
                         vocab_size=args.vocab, tie_word_embeddings=True)
    base = LlamaForCausalLM(config)
    models = {arm: copy.deepcopy(base) for arm in ARMS}
    optimizers = {arm: torch.optim.AdamW(m.parameters(), lr=1e-4) for arm, m in models.items()}
    steps = args.rounds * args.steps_per_block + 1
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq)) for _ in range(steps)]
    wall: dict[str, list[float]] = {arm: [] for arm in ARMS}
    cpu: dict[str, list[float]] = {arm: [] for arm in ARMS}

    def train(arm: str, ids: list[torch.Tensor]) -> None:
        model, optimizer = models[arm], optimizers[arm]
        for batch in ids:
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for arm in ARMS:  # warm-up step, not timed
        set_arm(arm)
        train(arm, batches[:1])
    for r in range(args.rounds):
        block = batches[1 + r * args.steps_per_block: 1 + (r + 1) * args.steps_per_block]
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            set_arm(arm)
            started, cpu_started = time.perf_counter(), time.process_time()
            train(arm, block)
            wall[arm].append(time.perf_counter() - started)
            cpu[arm].append(time.process_time() - cpu_started)
        print(f"round {r + 1}: " + ", ".join(f"{arm} {wall[arm][-1]:.2f} s" for arm in ARMS), flush=True)
    set_arm("off")
    reference = dict(models["off"].named_parameters())
    for arm in ARMS:
        same = all(torch.equal(p, reference[name]) for name, p in models[arm].named_parameters())
        w, c = statistics.median(wall[arm]), statistics.median(cpu[arm])
        w_off, c_off = statistics.median(wall["off"]), statistics.median(cpu["off"])
        print(f"{arm:8s} median block {w:.2f} s wall, {c:.2f} s CPU; vs off: wall x{w / w_off:.3f}, "
              f"CPU x{c / c_off:.3f}; same bits as off: {same}")


if __name__ == "__main__":
    main()
