"""Shared test set-up: offline, one torch thread, tiny configs written into tmp_path.

Tests by kind: ``tests/unit/`` holds the pure ones (math, parsing, configs, import rules: no model is
built or loaded, a few seconds in all); ``tests/`` the ones that run stages, models, servers or
processes. Helpers several files use live in ``tests/helpers/common.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
# the public data sets the shipped gsm8k eval task and the benchmarks read ($ALIGNPIPE_DATA_DIR/gsm8k/...)
os.environ.setdefault("ALIGNPIPE_DATA_DIR", str(SHARED_DATA))


@pytest.fixture
def tiny_cfg(tmp_path):
    """``tiny_cfg(*overrides)`` -> RunConfig from configs/tiny.yaml writing under tmp_path, no progress bar."""
    from pipeline.config import load_config

    def make(*overrides: str):
        return load_config(
            REPO / "configs" / "tiny.yaml",
            [f"output_root={tmp_path / 'outputs'}", "logging.progress_bar=false", *overrides],
        )

    return make


@pytest.fixture(scope="module")
def tiny_base() -> str:
    """The tiny base model's folder (configs/tiny.yaml's model, built once and cached by ``prepare_base``)."""
    from pipeline.config import load_config
    from pipeline.models import prepare_base

    return prepare_base(load_config("configs/tiny.yaml").model)


@pytest.fixture
def tiny_dropout_base(tmp_path, tiny_cfg):
    """``tiny_dropout_base(p) -> overrides``: the tiny base model copied with ``attention_dropout=p`` in its
    config.json (so its attention modules are built with it), as ``model.source=local`` overrides."""
    import json
    import shutil

    from pipeline.models import prepare_base

    def make(p: float) -> list[str]:
        folder = tmp_path / f"tiny-dropout-{p}"
        if not folder.exists():
            shutil.copytree(prepare_base(tiny_cfg().model), folder)
            config = json.loads((folder / "config.json").read_text())
            config["attention_dropout"] = p
            (folder / "config.json").write_text(json.dumps(config))
        return ["model.source=local", f"model.path={folder}"]

    return make


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (the shared real data sets live beside the repository)")
    return path


@pytest.fixture
def one_rank_process_group(monkeypatch):
    """The environment deepspeed.initialize reads to start a one-process group (gloo, CPU); the group is
    destroyed afterwards, with DeepSpeed's cached clone of its world group, which would otherwise point the
    next test's engine at the destroyed group ("Group ... is not registered")."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        groups._WORLD_GROUP = None
