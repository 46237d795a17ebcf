"""vLLM's OpenAI-compatible server for ``vllm_mode="server"``: ``rlhf-ext vllm-serve``
starts it (``serve``), and ``ServerEngine`` is the trainers' side of it: every process
sends its own prompts, the main process the policy's weights between rollouts.
``make_engine`` gives the trainers the engine their ``vllm_mode`` names.
``vllm_engine`` holds what both modes share (the requests' fields, the merged weights).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .sampling import Completions, row_seeds
from .vllm_engine import CPU_ENV, ColocateEngine, checkpoint, completions_from_rows, request_fields


class ServerEngine:
    """A vLLM server (``rlhf-ext vllm-serve``) at ``vllm_server_base_url`` or
    host:port. Every process sends its own prompts; the main process sends the weights,
    as a checkpoint folder the server reads (the server runs on this machine)."""

    def __init__(self, tokenizer, args):
        self.tokenizer, self.args = tokenizer, args
        self.url = (args.vllm_server_base_url or
                    f"http://{args.vllm_server_host}:{args.vllm_server_port}").rstrip("/")
        self.model = wait_for_server(self.url, args.vllm_server_timeout)
        self.folder = tempfile.mkdtemp(prefix="rlhf_ext-vllm-sync-")

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.args.vllm_server_timeout) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"vLLM server {self.url}{path}: HTTP {err.code}: "
                               f"{err.read().decode()[:500]}") from err
        return json.loads(text) if text.strip() else {}

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 row_keys: Sequence[int] | None = None) -> Completions:
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        seeds = row_seeds(seed, row_keys, len(ids))

        def one(i: int) -> tuple[list[int], list[float]]:
            body = {"model": self.model, "prompt": ids[i], "logprobs": 0,
                    "return_tokens_as_token_ids": True,
                    **request_fields(temperature, top_k, top_p, max_new_tokens, eos, seeds[i])}
            choice = self._post("/v1/completions", body)["choices"][0]
            tokens = [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]
            return tokens, choice["logprobs"]["token_logprobs"]

        with ThreadPoolExecutor(max_workers=min(64, max(1, len(ids)))) as pool:
            rows = list(pool.map(one, range(len(ids))))
        return completions_from_rows(self.tokenizer, rows)

    def sync(self, model: nn.Module) -> None:
        """Write the merged weights, have the server reload them (main process only)."""
        from safetensors.torch import save_file

        if self.args.process_index == 0:
            weights = checkpoint(model)
            path = os.path.join(self.folder, "model.safetensors")
            save_file(weights, path, metadata={"format": "pt"})
            self._post("/collective_rpc", {"method": "reload_weights",
                                           "kwargs": {"weights_path": self.folder}})
            self._post("/reset_prefix_cache", {})

    def close(self) -> None:
        """The server keeps running (it is its own process); the sync folder goes."""
        shutil.rmtree(self.folder, ignore_errors=True)


def wait_for_server(url: str, timeout: float) -> str:
    """Wait until the server at ``url`` answers /health; return the model name it serves."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                return json.loads(r.read())["data"][0]["id"]
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no vLLM server answered at {url} within {timeout:.0f} s: "
                                   "start one with `rlhf-ext vllm-serve --model PATH`") from None
            time.sleep(1.0)


def make_engine(model: nn.Module, tokenizer, args, max_length: int, rows: int):
    """The engine ``args.vllm_mode`` names (``ColocateEngine`` reads ``max_length`` and
    ``rows``)."""
    if args.vllm_mode == "colocate":
        return ColocateEngine(model, tokenizer, args, max_length, rows)
    if args.vllm_mode == "server":  # it serves what it was started with: send the policy
        engine = ServerEngine(tokenizer, args)
        engine.sync(model)
        return engine
    raise ValueError(f"vllm_mode must be colocate or server, got {args.vllm_mode!r}")


def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000,
                  extra: list[str] = ()) -> tuple[list[str], dict]:
    """The command and environment of a vLLM server for ``rlhf-ext vllm-serve``: vLLM's
    OpenAI-compatible server, sampler log-probs after the temperature, weight reloads
    (``/collective_rpc``) and runtime LoRA adapters allowed."""
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if not torch.cuda.is_available():
        env.update({k: env.get(k, v) for k, v in {**CPU_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}.items()})
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", host, "--port", str(port), "--generation-config", "vllm",
           "--logprobs-mode", "processed_logprobs"]
    if not torch.cuda.is_available():
        cmd.append("--enforce-eager")
    return cmd + list(extra), env


def serve(model: str, host: str, port: int, extra: list[str]) -> int:
    """Run the server until it exits or this process is stopped (``rlhf-ext vllm-serve``).
    vLLM's API server does not stop its engine processes when it gets SIGTERM, so the
    server runs in a process group of its own and the whole group is stopped: on SIGTERM
    or Ctrl-C here, and when the server exits."""
    cmd, env = serve_command(model, host, port, extra)
    server = subprocess.Popen(cmd, env=env, preexec_fn=os.setpgrp)

    def stop(signum, frame):
        _stop_group(server.pid)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return server.wait()
    finally:
        _stop_group(server.pid)


def _stop_group(group: int, grace: float = 10.0) -> None:
    """SIGTERM to every process of ``group``, SIGKILL to those alive ``grace`` s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
