"""Rollouts on vLLM (rlhf_ext.vllm_engine), the CPU build, on a small Llama whose heads are 32
wide (vLLM's CPU attention takes 32 and up): its samples' log-probs are the policy's, it
follows the policy's optimizer steps (full weights and LoRA), its side effects on the process
are undone, GRPO trains on it with the sampling correction, and the server mode serves and
takes weights. One worker runs them all (vLLM's import, ~15 s, once)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from conftest import run_recipe

import rlhf_ext
from rlhf_ext.logps import token_logps
from rlhf_ext.worlds.tiny import build_model, prompt_dataset

pytestmark = pytest.mark.xdist_group("vllm")
PROMPTS = ["the film was", "a story about", "the film was"]  # a repeated prompt, as in groups


def policy_logps(model, tok, prompts, completions, temperature):
    """log pi(token) of each completion token at ``temperature``, by our forward."""
    out = []
    with torch.no_grad():
        for prompt, ids in zip(prompts, completions):
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([p + ids])).logits[:, len(p) - 1:-1].float()
            out.append(token_logps(logits / temperature, torch.tensor([ids]))[0])
    return out


def environment() -> dict:
    """os.environ but torch's inductor cache folder (torch sets it when first asked)."""
    return {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}


def largest_gap(model, tok, completions, temperature=0.7):
    ours = policy_logps(model, tok, PROMPTS, completions.ids, temperature)
    return max((a - torch.tensor(b)).abs().max().item() for a, b in zip(ours, completions.logps))


def test_colocated_engine_samples_as_the_policy_and_follows_its_steps(tok, tmp_path):
    from rlhf_ext.vllm_engine import ColocateEngine

    model = build_model("tiny4bit", tok, seed=0)  # heads of 32
    args = rlhf_ext.PPOConfig(output_dir=str(tmp_path), use_cpu=True, use_vllm=True)
    torch.manual_seed(3)
    threads, rng, env = torch.get_num_threads(), torch.get_rng_state(), environment()
    assert not dist.is_initialized()
    engine = ColocateEngine(model, tok, args, max_length=64, rows=len(PROMPTS))
    # vLLM's side effects undone: the RNG state, the thread count, set_num_threads itself,
    # the environment later processes would inherit (vLLM sets LD_PRELOAD, LOCAL_WORLD_SIZE...)
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert environment() == env
    torch.set_num_threads(threads + 1)
    assert torch.get_num_threads() == threads + 1
    torch.set_num_threads(threads)

    first = engine.generate(PROMPTS, max_new_tokens=10, temperature=0.7, seed=11)
    assert torch.equal(torch.get_rng_state(), rng)
    assert first.ids[0] != first.ids[2]  # one seed per row: a group's samples differ
    assert largest_gap(model, tok, first) < 1e-5
    for ids, finished in zip(first.ids, first.finished):  # ids stop after eos
        assert finished == (tok.eos_token_id in ids) and tok.eos_token_id not in ids[:-1]
    assert engine.generate(PROMPTS, max_new_tokens=10, temperature=0.7, seed=11).ids == first.ids

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.tensor([tok("the film was good and the story was bad")["input_ids"]])
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    assert largest_gap(model, tok, first) > 1e-3  # the step moved the policy's log-probs
    engine.sync(model)
    after = engine.generate(PROMPTS, max_new_tokens=10, temperature=0.7, seed=11)
    assert largest_gap(model, tok, after) < 1e-5
    engine.close()
    assert not dist.is_initialized()  # vLLM's process group is gone with it
    assert environment() == env


def test_model_sampler_on_vllm_agrees_with_ours_on_more_prompts_than_a_step_holds(tok):
    """The demos' sampler of a fixed model: on vLLM its greedy replies are ours and its
    sampled tokens' log-probs the model's; 96 prompts of ~50 tokens are more than vLLM's
    default 4096 tokens a step, which split a prompt over two steps and crashed the seeded
    sampling on a CPU ("CPU Generator does not use offset") until the engine took whole
    prompts only."""
    from rlhf_ext.sampling import generate_completions
    from rlhf_ext.vllm_engine import ModelSampler

    model = build_model("tiny4bit", tok, seed=0)
    words = "the film was good and the story was bad but the music was".split()
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(48)) for i in range(96)]
    length = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    assert len(prompts) * length > 4096
    sampler = ModelSampler(model, tok, True, prompts, 8, rows=len(prompts))
    greedy = sampler(prompts, 8, 0.0)
    assert greedy.ids == generate_completions(model, tok, prompts, 8, temperature=0.0).ids
    drawn = sampler(prompts, 8, 1.0, seed=5, return_logps=True)
    ours = policy_logps(model, tok, prompts[:8], drawn.ids[:8], 1.0)
    assert max((a - torch.tensor(b)).abs().max().item()
               for a, b in zip(ours, drawn.logps)) < 1e-5
    assert sampler(prompts, 8, 1.0, seed=5).ids == drawn.ids  # seeded per row
    with pytest.raises(ValueError, match="temperature-1 log-probs need temperature 1"):
        sampler(prompts, 8, 0.7, return_logps=True)
    sampler.close()
    assert not dist.is_initialized()


def test_grpo_with_lora_samples_on_vllm_and_corrects_for_it(tok, tmp_path):
    """Every rollout after the first samples from the LoRA policy its optimizer steps made:
    the gap between vLLM's log-probs and the policy's (TRL's
    sampling/sampling_logp_difference) stays at float32 rounding, and the correction's
    ratios at 1; with a stale engine the gap would be that of a step at lr 0.05."""
    from peft import LoraConfig

    model = build_model("tiny4bit", tok, seed=0)
    args = rlhf_ext.GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True,
        use_vllm=True, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, gradient_checkpointing=False, save_strategy="no",
        learning_rate=0.05, max_steps=3, logging_steps=1, temperature=0.7,
        vllm_importance_sampling_mode="token_truncate")

    def short(completions, **kwargs):
        return [-float(len(c)) for c in completions]

    trainer = rlhf_ext.GRPOTrainer(
        model, reward_funcs=short, args=args, train_dataset=prompt_dataset(6, seed=1),
        processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in trainer.policy.named_parameters() if "lora_B" in k}
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3
    for log in logs:
        assert log["sampling/sampling_logp_difference/max"] < 1e-4
        assert abs(log["sampling/importance_sampling_ratio/min"] - 1) < 1e-4
        assert abs(log["sampling/importance_sampling_ratio/max"] - 1) < 1e-4
    assert "timing/vllm_start" in logs[0] and "timing/sync" in logs[1]
    moved = max((p - before[k]).abs().max().item()
                for k, p in trainer.policy.named_parameters() if k in before)
    assert moved > 1e-3
    assert trainer.engine is None and not dist.is_initialized()  # closed when train ended


def test_online_dpo_samples_each_round_on_vllm_from_the_trained_policy(tok, tmp_path):
    """Round 0 starts the engine from the policy; before round 1 samples, the engine takes
    round 0's trained weights: its log-probs are then the trained policy's."""
    from rlhf_ext.judges import FunctionJudge
    from rlhf_ext.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    from rlhf_ext.vllm_engine import ColocateEngine
    from rlhf_ext.worlds.tiny import oracle_score

    model = build_model("tiny4bit", tok, seed=0)
    args = OnlineDPOConfig(
        output_dir=str(tmp_path), num_rounds=2, num_generations=2, max_new_tokens=8,
        per_device_train_batch_size=4, learning_rate=5e-3, beta=0.1, max_length=64,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, use_vllm=True,
        temperature=0.7)
    judge = FunctionJudge(lambda prompts, texts: [oracle_score(t) for t in texts], scale=4.0)
    trainer = OnlineDPOTrainer(model, judge, args, train_dataset=prompt_dataset(4, seed=2),
                               processing_class=tok)
    synced, sync = [], ColocateEngine.sync

    def checked_sync(engine, policy):  # the real sync, then a look at what it gave
        sync(engine, policy)
        synced.append(largest_gap(policy, tok, engine.generate(
            PROMPTS, max_new_tokens=10, temperature=0.7, seed=5)))

    before = {k: v.clone() for k, v in model.state_dict().items()}
    ColocateEngine.sync = checked_sync
    try:
        trainer.train()
    finally:
        ColocateEngine.sync = sync
    assert len(synced) == 1 and synced[0] < 1e-5  # once, before round 1
    assert max((v - before[k]).abs().max().item() for k, v in model.state_dict().items()) > 1e-3
    samples = json.loads((tmp_path / "round-1" / "samples.json").read_text())
    assert len(samples) == 4 and all(len(pair) == 2 for pair in samples)
    assert trainer.engine is None and not dist.is_initialized()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_mode_serves_the_policy_and_takes_its_weights(world_dir, tok, tmp_path):
    """``rlhf-ext vllm-serve`` on 127.0.0.1: the client samples from it the policy's
    log-probs and, after a change, sends the new weights; then GRPO on two processes (DDP)
    samples from it: each process sends its own prompts, the main one the weights, at the
    start (the server holds other weights by then) and after every step. The server is
    stopped at the end."""
    from rlhf_ext.vllm_server import ServerEngine

    model = build_model("tiny4bit", tok, seed=0)
    model.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "rlhf_ext.cli", "vllm-serve", "--model", str(tmp_path / "policy"),
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True)
    try:
        args = rlhf_ext.PPOConfig(output_dir=str(tmp_path), use_cpu=True, use_vllm=True,
                                  vllm_mode="server", vllm_server_host="127.0.0.1",
                                  vllm_server_port=port, vllm_server_timeout=300)
        engine = ServerEngine(tok, args)
        first = engine.generate(PROMPTS, max_new_tokens=10, temperature=0.7, seed=11)
        assert first.ids[0] != first.ids[2]
        assert largest_gap(model, tok, first) < 1e-5
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        assert largest_gap(model, tok, first) > 1e-3
        engine.sync(model)
        after = engine.generate(PROMPTS, max_new_tokens=10, temperature=0.7, seed=11)
        assert largest_gap(model, tok, after) < 1e-5
        engine.close()

        out = tmp_path / "grpo"
        run_recipe(["--config_file", "accelerate_configs/ddp.yaml", "--num_processes", "2",
                    "recipes/ppo.py", "--config", "recipes/tiny/grpo_oracle.yaml",
                    "--tiny_world_dir", str(world_dir),
                    "--model_name_or_path", str(tmp_path / "policy"),
                    "--dataset_name", str(world_dir / "data" / "prompts_rl"),
                    "--num_train_epochs", "2", "--rollout_batch_size", "8",
                    "--per_device_train_batch_size", "8", "--logging_steps", "1",
                    "--tiny_eval_prompts", "0", "--num_sample_generations", "0",
                    "--use_vllm", "true", "--vllm_mode", "server",
                    "--vllm_server_host", "127.0.0.1", "--vllm_server_port", str(port),
                    "--output_dir", str(out)], launcher="accelerate_config")
        summary = json.loads((out / "ppo_summary.json").read_text())
        assert summary["world_size"] == 2 and summary["replica_drift"] == 0.0
        steps = [h for h in summary["log_history"] if "loss" in h]
        assert len(steps) == 2
        for h in steps:  # both processes' samples, from the policy as it was at each rollout
            assert h["sampling/sampling_logp_difference/max"] < 1e-4
    finally:
        server.terminate()  # the command stops vLLM's engine processes with the server
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        time.sleep(1)
        left = subprocess.run(["pgrep", "-s", str(server.pid)], capture_output=True,
                              text=True).stdout.split()
        for pid in left:  # whatever survived, before the assertion names it
            os.kill(int(pid), signal.SIGKILL)
    assert not left, f"vLLM processes outlived the server: {left}"
