"""The ``vllm`` rollout backend: starts (or connects to) ``vllm_worker.py`` and speaks its HTTP/JSON protocol.

Process. The worker runs with ``rollout.vllm.python`` (its own environment, ``make vllm-env``) in a new
process group, its output in ``<work_dir>/vllm_worker.log``; it answers on 127.0.0.1 only. ``close()``
(also on exceptions, via ``open_backend`` or ``atexit``) asks it to stop, then ends its process group; the
worker also exits by itself when the stage's process is gone. With ``rollout.vllm.base_url`` nothing is
started or stopped.

Timeouts. Start-up waits at most ``startup_timeout_s`` for the worker's ready line, each request at most
``request_timeout_s``; a dead worker or one that does not answer in time raises
:class:`~stages.rollout_backend.RolloutEngineError` naming the exit code, the timeout and the log's last
lines. No caller waits forever.

Weight sync (``sync_weights(policy)``). Full fine-tuning (and freeze / gradual unfreeze): the policy's
parameters, under their Hugging Face names, are written to ``<work_dir>/vllm_sync/weights/model.safetensors``
and loaded into the running engine in place (vLLM's ``reload_weights``; the prefix cache is reset). LoRA / rsLoRA
policies: the adapter is saved to ``<work_dir>/vllm_sync/adapter-<N>`` and the next requests name it with a
new LoRA id, so the engine hot-loads it (base weights untouched).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.config import REPO_ROOT, VLLMRolloutConfig
from stages.rollout_backend.base import Generation, RolloutEngineError, Sampling, stream_seed

WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
LOG_TAIL_LINES = 30
# the CPU build otherwise reserves gpu_memory_utilization (0.5) of the machine's RAM for its KV cache
CPU_KV_CACHE_GIB = 2.0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def peft_lora_rank(policy: Any) -> int | None:
    """The LoRA rank of a PEFT policy (None for a plain model)."""
    config = getattr(policy, "peft_config", None)
    if not config:
        return None
    first = next(iter(config.values()))
    return int(getattr(first, "r", 0)) or None


class VLLMBackend:
    """See the module docstring. ``tokenizer``: its eos id stops each response, as HF ``generate`` does;
    ``lora_rank``: > 0 starts the engine with LoRA enabled (a LoRA policy will be synced as an adapter)."""

    name = "vllm"

    def __init__(self, vcfg: VLLMRolloutConfig, model_dir: str, tokenizer: Any, work_dir: Any, *,
                 max_model_len: int | None = None, model_dtype: str = "auto", lora_rank: int | None = None):
        self.vcfg, self.model_dir = vcfg, str(model_dir)
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work_dir / "vllm_worker.log"
        self.sync_dir = self.work_dir / "vllm_sync"
        self.proc: subprocess.Popen | None = None
        self.base_url: str | None = None
        self.lora: dict[str, Any] | None = None  # the adapter the engine samples with, once synced
        self.syncs = 0
        self.sync_seconds: list[float] = []
        if vcfg.base_url:
            self.base_url = vcfg.base_url.rstrip("/")
            self.info = self._request("GET", "/health", None, vcfg.startup_timeout_s)
        else:
            self._start(max_model_len, vcfg.dtype if vcfg.dtype != "auto" else model_dtype, lora_rank)

    # ------------------------------------------------------------------------------------ process
    def _start(self, max_model_len: int | None, dtype: str, lora_rank: int | None) -> None:
        v = self.vcfg
        python = Path(v.python) if Path(v.python).is_absolute() else REPO_ROOT / v.python
        if not python.exists():
            raise RolloutEngineError(f"rollout.vllm.python={v.python} does not exist: run `make vllm-env`, or point "
                                     "it at an interpreter with vllm installed")
        cmd = [str(python), str(WORKER), "--model", self.model_dir, "--port", "0", "--dtype", dtype,
               "--gpu-memory-utilization", str(v.gpu_memory_utilization), "--parent-pid", str(os.getpid()),
               "--engine-args", json.dumps(v.engine_args)]
        if v.max_model_len or max_model_len:
            cmd += ["--max-model-len", str(v.max_model_len or max_model_len)]
        kv_cache_gib = v.kv_cache_gib
        if kv_cache_gib is None and not _has_cuda():
            kv_cache_gib = CPU_KV_CACHE_GIB
        if kv_cache_gib is not None:
            cmd += ["--kv-cache-gib", str(kv_cache_gib)]
        if v.enforce_eager:
            cmd.append("--enforce-eager")
        if lora_rank:
            cmd += ["--max-lora-rank", str(lora_rank)]
        env = dict(os.environ)
        # the worker's interpreter must not pick up this environment's packages
        for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(key, None)
        log = open(self.log_path, "ab")
        log.write(f"\n[alignpipe] starting: {' '.join(cmd)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env,
                                     start_new_session=True, cwd=str(REPO_ROOT))
        log.close()
        atexit.register(self.close)
        lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + v.startup_timeout_s
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    self._fail(f"the vLLM worker exited during start-up (code {self.proc.returncode})")
                if time.monotonic() > deadline:
                    self._fail(f"the vLLM worker was not ready within rollout.vllm.startup_timeout_s="
                               f"{v.startup_timeout_s:g} s")
                continue
            try:
                ready = json.loads(line)
            except ValueError:
                continue
            if ready.get("ready"):
                break
        self.info = ready
        self.base_url = f"http://127.0.0.1:{ready['port']}"

    def _fail(self, what: str) -> None:
        tail = log_tail(self.log_path)
        self.close()
        raise RolloutEngineError(f"{what}. Log {self.log_path}, last lines:\n{tail}")

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None and self.base_url is not None:
            try:
                self._request("POST", "/shutdown", {}, 5.0, check=False)
                proc.wait(timeout=10)
            except (RolloutEngineError, subprocess.TimeoutExpired):
                pass
        # vLLM starts its own engine processes: end the worker's whole process group
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                proc.wait(timeout=wait)
                time.sleep(0.2)  # let the group's other members go too
            except subprocess.TimeoutExpired:
                continue
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(self.sync_dir, ignore_errors=True)  # weights / adapters written for the engine

    # ----------------------------------------------------------------------------------- requests
    def _request(self, method: str, path: str, body: dict[str, Any] | None, timeout: float,
                 check: bool = True) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("traceback") or detail
            except ValueError:
                pass
            raise RolloutEngineError(f"the vLLM worker refused {path}: HTTP {err.code}\n{detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
            if not check:
                raise RolloutEngineError(str(err)) from None
            if self.proc is not None:
                try:  # a worker that just died may not have been reaped yet
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc is not None and self.proc.poll() is not None:
                self._fail(f"the vLLM worker died (exit code {self.proc.returncode}) during {path}")
            if isinstance(err, TimeoutError) or "timed out" in str(err):
                self._fail(f"the vLLM worker did not answer {path} within {timeout:g} s "
                           "(rollout.vllm.request_timeout_s); it was stopped")
            self._fail(f"cannot reach the vLLM worker at {self.base_url} for {path}: {err}")
            raise  # unreachable: _fail raises

    # -------------------------------------------------------------------------------- the backend
    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[list[Generation]]:
        n = sampling.n
        prompts = [list(map(int, p)) for p in prompt_ids for _ in range(n)]
        if sampling.temperature == 0:
            seeds = None
        elif sampling.prompt_seeds is not None:
            seeds = [int(s) for s in sampling.prompt_seeds]
        else:
            seeds = [stream_seed(sampling.seed, i, k) for i in range(len(prompt_ids)) for k in range(n)]
        body = {"prompts": prompts, "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                "seeds": seeds, "stop_token_ids": [self.eos_id], "logprobs": sampling.logprobs, "lora": self.lora}
        outputs = self._request("POST", "/generate", body, self.vcfg.request_timeout_s)["outputs"]
        if len(outputs) != len(prompts):
            raise RolloutEngineError(f"the vLLM worker answered {len(outputs)} of {len(prompts)} prompts")
        rows = []
        for out in outputs:
            ids = out["token_ids"]
            finished = bool(ids) and ids[-1] == self.eos_id
            rows.append(Generation(ids, finished, out.get("logprobs")))
        return [rows[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def sync_weights(self, policy: Any) -> None:
        """Make the engine sample from ``policy`` (its current weights); see the module docstring."""
        started = time.perf_counter()
        self.syncs += 1
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        if peft_lora_rank(policy):
            if not self.info.get("lora"):
                raise RolloutEngineError("a LoRA policy needs the vLLM engine started with LoRA on (lora_rank)")
            folder = self.sync_dir / f"adapter-{self.syncs}"
            policy.save_pretrained(str(folder))
            if self.lora is not None:  # the engine keeps one adapter (max_loras=1): the old folder is done
                shutil.rmtree(self.lora["path"], ignore_errors=True)
            self.lora = {"name": f"policy-{self.syncs}", "id": self.syncs, "path": str(folder.resolve())}
        else:
            from safetensors.torch import save_file

            folder = self.sync_dir / "weights"
            folder.mkdir(parents=True, exist_ok=True)
            save_file(policy_hf_state(policy), str(folder / "model.safetensors"))
            self._request("POST", "/load_weights", {"path": str(folder.resolve())}, self.vcfg.request_timeout_s)
        self.sync_seconds.append(time.perf_counter() - started)


def policy_hf_state(policy: Any) -> dict[str, Any]:
    """The policy's base weights under their Hugging Face names, contiguous on the CPU: every parameter of a
    plain model (tied parameters once, under their first name: vLLM ties them again); for a PEFT LoRA model
    the base layers' weights without the adapter (``base_model.model.`` and ``.base_layer`` dropped, no
    ``lora_`` tensors). All of them, not only the trainable ones: vLLM's in-place reload re-processes whole
    layers."""
    out = {}
    peft = getattr(policy, "peft_config", None) is not None
    for name, param in policy.named_parameters():
        if peft:
            if ".lora_" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[name] = param.detach().to("cpu").contiguous()
    return out


def write_policy_folder(policy: Any, folder: Path) -> Path:
    """An HF folder (``config.json`` + ``model.safetensors``) holding ``policy``'s base weights exactly as they
    are in memory (no dtype round trip through a saved stage), for the engine to start from."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    base = policy.get_base_model() if getattr(policy, "peft_config", None) is not None else policy
    base.config.to_json_file(str(folder / "config.json"))
    save_file(policy_hf_state(policy), str(folder / "model.safetensors"))
    return folder
