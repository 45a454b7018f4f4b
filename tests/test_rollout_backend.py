"""The rollout-backend interface without vLLM (stages/rollout_backend): the hf backend samples exactly as the
stages' own loops did (same seeds, same ids), the helpers on hand-worked rows, the ``rollout`` config
section, and the vllm client's failure handling against fake workers (a worker that dies, one that never
gets ready, one that hangs on a request, one that dies mid-request): each raises a clear
``RolloutEngineError`` within its timeout and leaves no process behind. tests/test_rollout_vllm.py runs the
real engine."""

from __future__ import annotations

import os
import stat
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import ConfigError, VLLMRolloutConfig
from stages.rollout_backend import (
    Generation,
    HFBackend,
    RolloutEngineError,
    Sampling,
    cut_at_eos,
    stream_seed,
)

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ helpers
def test_cut_at_eos_keeps_the_eos_and_drops_what_follows():
    assert cut_at_eos([5, 6, 2, 0, 0], eos_id=2, pad_id=0) == Generation([5, 6, 2], True)
    assert cut_at_eos([5, 2, 7, 2], eos_id=2, pad_id=0) == Generation([5, 2], True)  # the first eos ends it
    assert cut_at_eos([5, 6, 7], eos_id=2, pad_id=0) == Generation([5, 6, 7], False)  # cut at max_new_tokens


def test_stream_seeds_are_fixed_and_distinct():
    assert stream_seed(0, 3, 1) == stream_seed(0, 3, 1)
    seeds = {stream_seed(s, i, k) for s in range(2) for i in range(4) for k in range(3)}
    assert len(seeds) == 24 and all(0 <= x < 2 ** 63 for x in seeds)


def test_engine_logp_diff_is_the_mean_over_real_tokens_only():
    from stages.ppo.rollout import engine_logp_diff

    old = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # |-1 - -1.5| = 0.5, |-2 - -2| = 0, |-0.5 - -0.5| = 0 over 3 real tokens; padding (9.0) never counts
    assert engine_logp_diff([[-1.0, -2.0], [-0.5]], old, mask) == pytest.approx(0.5 / 3)


def test_sampling_refuses_what_it_cannot_mean():
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sampling(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(max_new_tokens=4, temperature=-1)
    with pytest.raises(ValueError, match="prompt_seeds"):
        Sampling(max_new_tokens=4, n=2, prompt_seeds=[1, 2])


# -------------------------------------------------------------------------------------- hf backend
@pytest.fixture(scope="module")
def tiny_model():
    from pipeline.config import load_config
    from pipeline.models import load_model, load_tokenizer, prepare_base
    from stages.chat import prompt_ids

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    base = prepare_base(cfg.model)
    tok = load_tokenizer(base, cfg.model, cfg.chat)
    model = load_model(base, cfg.model, tok).eval()
    prompts = [prompt_ids(tok, [{"role": "user", "content": text}], None)
               for text in ("What is 2 + 3?", "Name a colour.", "Say hello.", "Count to five, please.", "Why?")]
    return model, tok, prompts


def _old_stage_loop(model, tok, prompts, n, max_new, temperature, batch_size, seed):
    """The loop rlaif_label / best_of_n / distill ran before the interface (kept here as the reference)."""
    from stages.batching import left_pad
    from stages.generation import neutral_generate, neutral_generation_config

    out = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        ids, mask = left_pad(prompts[start:start + batch_size], tok.pad_token_id)
        torch.manual_seed(seed + b)
        gen_cfg = neutral_generation_config(tok, max_new, do_sample=temperature > 0, temperature=temperature or 1.0,
                                            num_return_sequences=n)
        with torch.no_grad():
            rows = neutral_generate(model, gen_cfg, input_ids=ids, attention_mask=mask)[:, ids.shape[1]:].tolist()
        for i in range(ids.shape[0]):
            group = []
            for seq in rows[i * n:(i + 1) * n]:
                eos = tok.eos_token_id
                group.append(seq[:seq.index(eos) + 1] if eos in seq else [t for t in seq if t != tok.pad_token_id])
            out.append(group)
    return out


@pytest.mark.parametrize("n,temperature", [(3, 1.0), (1, 0.0), (2, 0.7)])
def test_hf_backend_samples_exactly_as_the_stages_did(tiny_model, n, temperature):
    model, tok, prompts = tiny_model
    backend = HFBackend(model, tok, torch.device("cpu"), batch_size=2)
    got = backend.generate(prompts, Sampling(max_new_tokens=12, temperature=temperature, n=n, seed=5))
    want = _old_stage_loop(model, tok, prompts, n, 12, temperature, 2, 5)
    assert [[g.token_ids for g in group] for group in got] == want
    assert all(g.finished == (g.token_ids[-1] == tok.eos_token_id) for group in got for g in group)
    again = backend.generate(prompts, Sampling(max_new_tokens=12, temperature=temperature, n=n, seed=5))
    assert again == got, "same seed, same samples"


# ------------------------------------------------------------------------------------------- config
def test_rollout_config_defaults_to_hf_and_leaves_stage_hashes_alone(tiny_cfg):
    from pipeline.stage import stage_section

    cfg = tiny_cfg()
    assert cfg.rollout.backend == "hf"
    assert "rollout" not in stage_section(cfg, "ppo")
    fake_python = sys.executable  # any existing file passes the check; the engine is not started here
    vllm = tiny_cfg("rollout.backend=vllm", f"rollout.vllm.python={fake_python}")
    for stage in ("ppo", "rlaif_label", "best_of_n", "distill"):
        assert stage_section(vllm, stage)["rollout"]["backend"] == "vllm", stage
    assert "rollout" not in stage_section(vllm, "sft")


def test_rollout_config_refuses_a_missing_engine_and_unsupported_policies(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"rollout.vllm.python=.*does not exist.*make vllm-env"):
        tiny_cfg("rollout.backend=vllm", f"rollout.vllm.python={tmp_path / 'nope' / 'python'}")
    tiny_cfg("rollout.backend=vllm", f"rollout.vllm.python={tmp_path / 'nope'}",
             "rollout.vllm.base_url=http://127.0.0.1:9")  # a running worker needs no interpreter here
    with pytest.raises(ConfigError, match=r"ppo.tuning.method='dora' is not supported"):
        tiny_cfg("rollout.backend=vllm", f"rollout.vllm.python={sys.executable}", "ppo.tuning.method=dora")
    tiny_cfg("rollout.backend=vllm", f"rollout.vllm.python={sys.executable}", "ppo.tuning.method=lora")
    with pytest.raises(ConfigError, match="rollout.backend"):
        tiny_cfg("rollout.backend=sglang")


def test_slurm_script_checks_the_vllm_environment_on_the_node(tiny_cfg, tmp_path):
    from pipeline.slurm import sbatch_script

    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    cfg = tiny_cfg("rollout.backend=vllm", f"rollout.vllm.python={python}")
    text, _ = sbatch_script(cfg, "ppo", tmp_path / "run.json")
    assert f"test -x {python} ||" in text and "rank 0 starts a vLLM worker" in text
    assert text.index(f"test -x {python}") < text.index("srun ")  # checked before the stage starts
    hf, _ = sbatch_script(tiny_cfg(), "ppo", tmp_path / "run.json")
    assert "vllm" not in hf


# ------------------------------------------------------------------------------- vllm client failures
FAKE_WORKER = '''
import json, os, sys, time, threading
from http.server import BaseHTTPRequestHandler, HTTPServer
mode = {mode!r}
# the log-probs the engine reports for [7, 8, eos]; echo_far's -20 makes token 8 far likelier to the trainer
ENGINE_LOGPROBS = {{"echo": [-1.0, -1.0, -1.0], "echo_far": [-1.0, -20.0, -1.0]}}
print("fake worker starting", file=sys.stderr, flush=True)
if mode == "exit":
    print("CUDA out of memory (fake)", file=sys.stderr, flush=True)
    sys.exit(7)
if mode == "never_ready":
    time.sleep(600)

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{{}}")
        if self.path == "/generate" and mode == "hang":
            time.sleep(600)
        if self.path == "/generate" and mode == "die":
            os._exit(9)
        if self.path == "/generate" and mode in ENGINE_LOGPROBS:  # answers every prompt with [7, 8, eos]
            eos = request["stop_token_ids"][0]
            logprobs = ENGINE_LOGPROBS[mode] if request["logprobs"] else None
            outputs = [{{"token_ids": [7, 8, eos], "finish_reason": "stop", "logprobs": logprobs}}
                       for _ in request["prompts"]]
            body = json.dumps({{"outputs": outputs}}).encode()
        else:
            body = json.dumps({{"ok": True}}).encode()
        calls.append(self.path)
        with open(os.environ.get("FAKE_CALLS", os.devnull), "a") as fh:
            fh.write(self.path + "\\n")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.path == "/shutdown":
            threading.Thread(target=server.shutdown).start()

calls = []
server = HTTPServer(("127.0.0.1", 0), H)
print(json.dumps({{"ready": True, "port": server.server_address[1]}}), flush=True)
server.serve_forever()
'''


def _fake_python(tmp_path: Path, mode: str) -> Path:
    """An 'interpreter' that ignores the worker script it is given and runs a fake worker instead."""
    script = tmp_path / f"fake_worker_{mode}.py"
    script.write_text(textwrap.dedent(FAKE_WORKER.format(mode=mode)))
    python = tmp_path / f"python_{mode}"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {script}\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return python


def _backend(tmp_path: Path, mode: str, **timeouts):
    from stages.rollout_backend.vllm_client import VLLMBackend

    vcfg = VLLMRolloutConfig(python=str(_fake_python(tmp_path, mode)), **timeouts)
    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    return VLLMBackend(vcfg, "unused-model-folder", tok, tmp_path / "work")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_worker_that_dies_at_start_raises_with_its_exit_code_and_log(tmp_path):
    started = time.monotonic()
    with pytest.raises(RolloutEngineError, match=r"exited during start-up \(code 7\)(.|\n)*CUDA out of memory"):
        _backend(tmp_path, "exit", startup_timeout_s=60)
    assert time.monotonic() - started < 30


def test_a_worker_that_never_gets_ready_times_out(tmp_path):
    started = time.monotonic()
    with pytest.raises(RolloutEngineError, match=r"not ready within rollout.vllm.startup_timeout_s=3 s"):
        _backend(tmp_path, "never_ready", startup_timeout_s=3)
    assert time.monotonic() - started < 30


def test_a_hung_request_times_out_and_the_worker_is_stopped(tmp_path):
    backend = _backend(tmp_path, "hang", request_timeout_s=2)
    pid = backend.proc.pid
    started = time.monotonic()
    with pytest.raises(RolloutEngineError, match=r"did not answer /generate within 2 s"):
        backend.generate([[1, 5, 6]], Sampling(max_new_tokens=4, temperature=0))
    assert time.monotonic() - started < 30
    assert backend.proc is None and not _alive(pid), "the hung worker is stopped"


def test_a_worker_that_dies_mid_request_raises_at_once(tmp_path):
    backend = _backend(tmp_path, "die", request_timeout_s=60)
    started = time.monotonic()
    with pytest.raises(RolloutEngineError, match=r"died \(exit code 9\) during /generate"):
        backend.generate([[1, 5, 6]], Sampling(max_new_tokens=4, temperature=0))
    assert time.monotonic() - started < 30


def test_close_stops_a_healthy_worker_and_is_idempotent(tmp_path):
    backend = _backend(tmp_path, "ok")
    pid = backend.proc.pid
    backend.close()
    backend.close()
    assert not _alive(pid)
    assert (tmp_path / "work" / "vllm_worker.log").read_text().count("fake worker starting") == 1


def test_open_backend_stops_the_worker_on_an_interrupt(tiny_cfg, tmp_path):
    from stages.rollout_backend import open_backend

    cfg = tiny_cfg("rollout.backend=vllm", f"rollout.vllm.python={_fake_python(tmp_path, 'echo')}")
    tok = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    with pytest.raises(KeyboardInterrupt):
        with open_backend(cfg, "unused", tok, lambda: None, "cpu", 4, 64, tmp_path / "work") as backend:
            pid = backend.proc.pid
            groups = backend.generate([[1, 5], [1, 6]], Sampling(max_new_tokens=4, n=2, seed=1))
            assert [[g.token_ids for g in grp] for grp in groups] == [[[7, 8, 2]] * 2] * 2
            assert all(g.finished for grp in groups for g in grp)
            raise KeyboardInterrupt
    assert not _alive(pid)


def test_ppo_with_an_engine_syncs_after_each_update_and_stops_it_on_an_interrupt(tiny_cfg, tmp_path, monkeypatch):
    """PPO's engine lifecycle against a fake worker answering [7, 8, eos]: started on the actor's weights,
    a weight sync before every rollout after an update (none before the first), stopped with the weights
    written for it removed when the run is interrupted."""
    from stages.ppo import trainer

    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    cfg = tiny_cfg("stages=[ppo]", "ppo.policy_from=base", "ppo.total_episodes=48",
                   "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]",
                   "rollout.backend=vllm", f"rollout.vllm.python={_fake_python(tmp_path, 'echo')}")
    seen = {}

    def interrupt(step: int) -> None:
        if step == 2:
            seen["pid"] = next(p for p in _children_named("fake_worker_echo"))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.run(cfg, on_step_end=interrupt)
    assert calls.read_text().split() == ["/generate", "/load_weights", "/generate", "/shutdown"]
    assert not _alive(seen["pid"])
    engine_dir = cfg.stage_dir("ppo") / "rollout_engine"
    assert (engine_dir / "vllm_worker.log").exists() and not (engine_dir / "start").exists()
    assert not (engine_dir / "vllm_sync").exists()


def test_ppo_with_an_engine_weights_each_tokens_policy_loss_by_the_capped_engine_ratio(tiny_cfg, tmp_path,
                                                                                        monkeypatch, caplog):
    """rollout.importance_sampling (auto: on with an engine) against a fake engine whose log-probs for the
    sampled [7, 8, eos] differ from the tiny model's (-1, -20, -1): the first minibatch's policy loss equals
    -mean(w * A) with w = min(exp(old_logp - engine_logp), cap) computed here from the rollout's tensors (the
    first minibatch's ratio is 1), the weight statistics are logged, and a warning is logged once when
    rollout_engine_logp_diff passes rollout.engine_logp_warn."""
    import json
    import logging

    from stages.ppo import trainer
    from stages.ppo.experience import PPORollout

    rollouts = []
    make_rollout = PPORollout.make_rollout

    def keep(self, step, timings):
        rollouts.append(make_rollout(self, step, timings))
        return rollouts[-1]

    monkeypatch.setattr(PPORollout, "make_rollout", keep)
    # one minibatch = one micro-batch per step, one epoch: the logged policy_loss is the first minibatch's
    cfg = tiny_cfg("stages=[ppo]", "ppo.policy_from=base", "ppo.total_episodes=16", "ppo.episodes_per_rollout=8",
                   "ppo.mini_batch_size=8", "ppo.train.save_steps=100",
                   "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]",
                   "rollout.backend=vllm", f"rollout.vllm.python={_fake_python(tmp_path, 'echo_far')}",
                   "rollout.engine_logp_warn=0.5")
    assert cfg.rollout.uses_importance_sampling and cfg.rollout.importance_sampling_cap == 2.0
    with caplog.at_level(logging.WARNING, logger="alignpipe.ppo"):
        trainer.run(cfg)
    first = json.loads((cfg.stage_dir("ppo") / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    rollout = rollouts[0]
    mask = rollout.response_mask.bool()
    assert mask.all(), "every fake answer is [7, 8, eos]"
    engine = torch.tensor([[-1.0, -20.0, -1.0]]).expand_as(rollout.old_logp)
    raw = torch.exp(rollout.old_logp.double() - engine.double())
    weights = raw.clamp(max=2.0)
    adv = rollout.advantages.double()
    want = float(-(weights * adv).mean())
    assert first["policy_loss"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    unweighted = float(-adv.mean())  # ~0: the advantages are whitened
    assert abs(want - unweighted) > 0.05, "the example must tell weighted from unweighted"
    assert first["rollout_is_weight_mean"] == pytest.approx(float(weights.mean()), rel=1e-5)
    assert first["rollout_is_capped_frac"] == pytest.approx(float((raw > 2.0).double().mean()))
    assert 0 < first["rollout_is_capped_frac"] < 1
    assert first["rollout_engine_logp_diff"] == pytest.approx(float((rollout.old_logp - engine).abs().mean()),
                                                              rel=1e-5)
    warned = [r.getMessage() for r in caplog.records if "rollout.engine_logp_warn=0.5" in r.getMessage()]
    assert len(warned) == 1, warned  # two steps above the threshold, one warning
    assert "rollout_engine_logp_diff=" in warned[0] and "min(exp(old_logp - engine_logp), 2.0)" in warned[0]


def test_engine_logp_warning_only_above_its_threshold(caplog):
    import logging

    from stages.ppo.trainer import PPOTrainer

    def check(limit, row):
        rollout = SimpleNamespace(engine_logp_warn=limit, importance_sampling_cap=2.0, uses_importance_sampling=False)
        fake = SimpleNamespace(cfg=SimpleNamespace(rollout=rollout), engine_logp_warned=False, step=3,
                               dist=SimpleNamespace(is_main=True))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="alignpipe.ppo"):
            PPOTrainer._check_engine_logp(fake, row)
        return [r.getMessage() for r in caplog.records]

    assert check(0.05, {"rollout_engine_logp_diff": 0.05}) == []  # at the threshold: quiet
    assert check(None, {"rollout_engine_logp_diff": 9.0}) == []   # turned off
    assert check(0.05, {}) == []                                  # hf: no engine, no diff
    (message,) = check(0.05, {"rollout_engine_logp_diff": 0.07})
    assert "step 3" in message and "rollout.importance_sampling is off" in message


def test_importance_sampling_config_and_what_the_stage_hashes_read(tiny_cfg):
    from pipeline.stage import config_changes, stage_section

    assert not tiny_cfg().rollout.uses_importance_sampling  # hf samples with the trainer's own model
    with pytest.raises(ConfigError, match=r"rollout.importance_sampling=true with rollout.backend='hf'"):
        tiny_cfg("rollout.importance_sampling=on")  # YAML reads on / off as true / false
    engine = ("rollout.backend=vllm", f"rollout.vllm.python={sys.executable}")
    assert tiny_cfg(*engine).rollout.uses_importance_sampling
    assert tiny_cfg(*engine, "rollout.importance_sampling=true").rollout.uses_importance_sampling
    assert not tiny_cfg(*engine, "rollout.importance_sampling=off").rollout.uses_importance_sampling
    with pytest.raises(ConfigError, match="rollout.importance_sampling"):
        tiny_cfg(*engine, "rollout.importance_sampling=sometimes")
    with pytest.raises(ConfigError, match="rollout.importance_sampling_cap"):
        tiny_cfg(*engine, "rollout.importance_sampling_cap=0.5")
    cfg = tiny_cfg(*engine)
    # PPO's hash reads the correction (it changes the update), not the warning threshold; the other sampling
    # stages read neither (their rollout section is what it was before these keys existed)
    assert set(stage_section(cfg, "ppo")["rollout"]) == {"backend", "vllm", "importance_sampling",
                                                         "importance_sampling_cap"}
    for stage in ("rlaif_label", "best_of_n", "distill"):
        assert set(stage_section(cfg, stage)["rollout"]) == {"backend", "vllm"}, stage
    # a vllm ppo stage made before the correction existed re-runs, and says why
    recorded = stage_section(cfg, "ppo")
    recorded["rollout"] = {k: v for k, v in recorded["rollout"].items() if k in ("backend", "vllm")}
    assert config_changes(recorded, cfg, "ppo") == ["rollout.importance_sampling: (not set) -> 'auto'",
                                                    "rollout.importance_sampling_cap: (not set) -> 2.0"]


def _children_named(fragment: str) -> list[int]:
    """Pids of this process's descendants whose command line contains ``fragment``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_text():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found
