"""The vLLM rollout worker: one vLLM engine behind a small HTTP/JSON protocol on 127.0.0.1.

Run with the interpreter of the vLLM environment (``make vllm-env``: ``.venv-vllm/bin/python``), never
imported by the project: it imports only vllm (+ torch / safetensors, which vllm brings) and the standard
library, so its transformers pin never meets the project's.

    .venv-vllm/bin/python stages/rollout_backend/vllm_worker.py --model FOLDER [--port 0] [...]

When it is ready it writes one line ``{"ready": true, "port": P, ...}`` to its standard output and nothing
else ever goes there (vLLM's own logs and prints are sent to standard error). Requests (POST, JSON bodies):

- ``/generate`` ``{"prompts": [[ids]], "max_tokens", "temperature" (0: greedy), "seeds" (one per prompt or
  null), "stop_token_ids", "logprobs" (bool), "lora": null | {"name", "id", "path"}}`` ->
  ``{"outputs": [{"token_ids", "finish_reason", "logprobs"}]}``. Sampling is plain: top-k/top-p/min-p off,
  no penalties, no minimum length, the engine's own eos ignored (``stop_token_ids`` are the caller's);
  the checkpoint's generation_config is not read (``generation_config="vllm"``).
- ``/load_weights`` ``{"path": folder}``: the folder's ``*.safetensors`` (HF parameter names, every
  parameter) are loaded into the running model in place (vLLM's ``reload_weights``), then the prefix cache
  is reset. -> ``{"seconds"}``.
- ``/reset_prefix_cache``, ``/shutdown``; ``GET /health``.

It exits when ``--parent-pid`` is given and that process is gone (no orphan engine after a killed stage).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, HTTPServer


class Engine:
    def __init__(self, args):
        from vllm import LLM

        kwargs = dict(model=args.model, skip_tokenizer_init=True, dtype=args.dtype, seed=0,
                      enforce_eager=args.enforce_eager, generation_config="vllm",
                      logprobs_mode="processed_logprobs")
        if args.max_model_len:
            kwargs["max_model_len"] = args.max_model_len
        if args.gpu_memory_utilization:
            kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
        if args.kv_cache_gib:
            kwargs["kv_cache_memory_bytes"] = int(args.kv_cache_gib * (1 << 30))
        if args.max_lora_rank:
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=args.max_lora_rank)
        kwargs.update(json.loads(args.engine_args or "{}"))
        self.llm = LLM(**kwargs)
        self.lora = bool(args.max_lora_rank)

    def generate(self, body):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, seeds = body["prompts"], body.get("seeds")
        temperature = float(body["temperature"])
        params = []
        for i in range(len(prompts)):
            params.append(SamplingParams(
                n=1, temperature=temperature, top_p=1.0, top_k=0, min_p=0.0, seed=None if seeds is None else seeds[i],
                max_tokens=int(body["max_tokens"]), min_tokens=0, ignore_eos=True,
                stop_token_ids=list(body["stop_token_ids"]), repetition_penalty=1.0, presence_penalty=0.0,
                frequency_penalty=0.0, logprobs=0 if body.get("logprobs") else None, detokenize=False))
        lora = None
        if body.get("lora"):
            from vllm.lora.request import LoRARequest

            spec = body["lora"]
            lora = LoRARequest(spec["name"], int(spec["id"]), spec["path"])
        results = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                    lora_request=lora, use_tqdm=False)
        outputs = []
        for result in results:
            out = result.outputs[0]
            logprobs = None
            if out.logprobs is not None:
                logprobs = [float(step[tok].logprob) for step, tok in zip(out.logprobs, out.token_ids)]
            outputs.append({"token_ids": list(out.token_ids), "finish_reason": out.finish_reason,
                            "logprobs": logprobs})
        return {"outputs": outputs}

    def load_weights(self, body):
        started = time.perf_counter()
        # vLLM's in-place reload (it re-applies the kernel-format processing the CPU/GPU layers need)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": body["path"]})
        self.llm.reset_prefix_cache()
        return {"seconds": time.perf_counter() - started}


def serve(engine, port, info):
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # requests are not logged (the log is for the engine)
            pass

        def _reply(self, code, payload):
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                self._reply(200, {"ok": True, **info})
            else:
                self._reply(404, {"error": f"unknown path {self.path}"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                with lock:
                    if self.path == "/generate":
                        payload = engine.generate(body)
                    elif self.path == "/load_weights":
                        payload = engine.load_weights(body)
                    elif self.path == "/reset_prefix_cache":
                        engine.llm.reset_prefix_cache()
                        payload = {"ok": True}
                    elif self.path == "/shutdown":
                        self._reply(200, {"ok": True})
                        threading.Thread(target=server.shutdown, daemon=True).start()
                        return
                    else:
                        self._reply(404, {"error": f"unknown path {self.path}"})
                        return
                self._reply(200, payload)
            except Exception as exc:  # the client raises it with the worker's traceback
                traceback.print_exc()
                self._reply(500, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})

    server = HTTPServer(("127.0.0.1", port), Handler)
    return server


def _exit_with_parent(parent_pid):
    while True:
        time.sleep(1.0)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            print(f"[vllm_worker] parent {parent_pid} is gone; exiting", file=sys.stderr, flush=True)
            if os.getpgrp() == os.getpid():  # started as its own group (the client does): vLLM's processes too
                os.killpg(os.getpid(), signal.SIGKILL)
            os._exit(3)
        except PermissionError:  # exists, owned by someone else
            pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF folder (config.json + safetensors)")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed in the ready line)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache size (default: vLLM's sizing)")
    parser.add_argument("--max-lora-rank", type=int, default=0, help="> 0: enable LoRA adapters up to this rank")
    parser.add_argument("--engine-args", default="{}", help="JSON object of more vllm.LLM arguments")
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args()

    # the protocol owns the real stdout; everything else (vLLM's logs, prints, child processes) goes to stderr
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if args.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    import vllm

    started = time.perf_counter()
    engine = Engine(args)
    server = serve(engine, args.port, {"model": args.model, "vllm": vllm.__version__, "lora": engine.lora})
    protocol.write(json.dumps({"ready": True, "port": server.server_address[1], "vllm": vllm.__version__,
                               "lora": engine.lora, "load_seconds": time.perf_counter() - started}) + "\n")
    protocol.flush()
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":  # vLLM's engine processes re-import this file: the guard keeps them from serving
    main()
