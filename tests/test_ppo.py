"""PPOTrainer end to end on the tiny world, metrics, and resume."""

import json
import math

import pytest
import torch
from conftest import ROOT, StopAt, run_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ext.heads import ValueModel
from rlhf_ext.ppo import PPOConfig, PPOTrainer
from rlhf_ext.worlds.tiny import build_model, oracle_score, prompt_dataset

METRICS = ["objective/kl", "objective/entropy", "objective/non_score_reward",
           "objective/rlhf_reward", "objective/scores", "policy/approxkl_avg",
           "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg",
           "val/ratio", "eps", "kl_coef"]
KL_BOUND = 8.0  # nats per sequence, sampled, to the SFT model


def run_ppo(config, world_dir, sft_dir, out, *extra):
    run_recipe(["recipes/ppo.py", "--config", config, "--tiny_world_dir", str(world_dir),
                "--model_name_or_path", str(sft_dir),
                "--dataset_name", str(world_dir / "data" / "prompts_rl"),
                "--output_dir", str(out), *extra], launcher="python")
    return json.loads((out / "ppo_summary.json").read_text())


def no_nan(history):
    return all(not (isinstance(v, float) and math.isnan(v)) for h in history for v in h.values())


def test_ppo_with_oracle_reward(sft_run, world_dir, tmp_path):
    sft_dir, sft = sft_run
    summary = run_ppo("recipes/tiny/ppo_oracle.yaml", world_dir, sft_dir, tmp_path / "ppo")
    assert summary["tiny/oracle_score"] > sft["tiny/oracle_score"] + 0.25, summary
    assert summary["tiny/kl_to_ref"] < KL_BOUND
    history = summary["log_history"]
    assert no_nan(history)
    logged = {k for h in history for k in h}
    assert set(METRICS) <= logged, set(METRICS) - logged
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # policy == ref at first
    assert (tmp_path / "ppo" / "samples.md").read_text().count("\n") > 3
    assert (tmp_path / "ppo" / "value_model" / "config.json").exists()
    assert "ppo" in (tmp_path / "ppo" / "README.md").read_text()


def make_trainer(tok, policy_dir, out, reward=None, **kw):
    settings = dict(rollout_batch_size=16, num_ppo_epochs=2, per_device_train_batch_size=8,
                    num_train_epochs=4, learning_rate=3e-3, response_length=12,
                    temperature=1.0, kl_coef=0.1, kl_target=1.0, kl_horizon=100)
    args = PPOConfig(output_dir=str(out), report_to="none", use_cpu=True,
                     save_strategy="steps", save_steps=2, logging_steps=1, disable_tqdm=True,
                     num_sample_generations=0, seed=3, **{**settings, **kw})
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    value = (ValueModel.from_backbone(str(policy_dir), seed=1)
             if args.uses_critic and not args.value_head_on_policy else None)
    return PPOTrainer(policy, args, tok, prompt_dataset(40, seed=2),
                      reward=reward or (lambda p, c: [oracle_score(x) for x in c]),
                      value_model=value)


GRPO = dict(advantage_estimator="grpo", num_generations=4, kl_loss_coef=0.05)


# 4 updates per iteration: stop at its end, or mid-way; GRPO (no value model) and PPO with
# the value head on the policy mid-way
@pytest.mark.parametrize("stop, estimator", [(8, {}), (6, {}), (6, GRPO),
                                             (6, dict(value_head_on_policy=True))])
def test_resume_matches_uninterrupted(world_dir, tmp_path, stop, estimator):
    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    build_model("tiny", tok, seed=0).save_pretrained(tmp_path / "policy")
    full = make_trainer(tok, tmp_path / "policy", tmp_path / "full", **estimator)
    full.train()
    part = make_trainer(tok, tmp_path / "policy", tmp_path / "part", **estimator)
    part.add_callback(StopAt(stop))
    part.train()
    assert part.state.global_step == stop
    checkpoint = tmp_path / "part" / f"checkpoint-{stop}"
    # mid-iteration, the checkpoint keeps the iteration's rollout for the remaining updates
    assert (checkpoint / "ppo_experience_0.pt").exists() == (stop % 4 != 0)
    assert (checkpoint / "value_model").exists() == part.args.uses_critic
    assert (checkpoint / "value_model" / "value_head.safetensors").exists() == \
        part.args.value_head_on_policy
    resumed = make_trainer(tok, tmp_path / "policy", tmp_path / "part", **estimator)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == full.state.global_step == 16
    assert resumed.kl_ctl.value == pytest.approx(full.kl_ctl.value, rel=1e-9)
    assert resumed.kl_ctl.value != 0.1  # the adaptive controller moved and was restored
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    if part.args.value_head_on_policy:  # the head learned, and its weights came back
        names = [n for n, _ in full.model.named_parameters() if n.startswith("value_model")]
        assert names == ["value_model.head.weight", "value_model.head.bias"]
        assert full.model.value_model.head.weight.abs().sum() > 0
    # the optimizer state came back too
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    torch.testing.assert_close(sa[0]["exp_avg"], sb[0]["exp_avg"], rtol=0, atol=1e-6)


def test_critic_free_estimators_lift_the_oracle_score(sft_run, world_dir, tmp_path):
    """recipes/tiny/grpo_oracle.yaml's settings, each critic-free estimator by name, in one
    process: the oracle score on the 256 held-out prompts the SFT model was judged on."""
    import yaml

    from rlhf_ext.worlds.tiny.evaluate import evaluate_policy
    from rlhf_ext.worlds.tiny.world import load_split

    sft_dir, sft = sft_run
    recipe = yaml.safe_load((ROOT / "recipes/tiny/grpo_oracle.yaml").read_text())
    fields = {k: v for k, v in recipe.items() if k in PPOConfig.__dataclass_fields__}
    tok = AutoTokenizer.from_pretrained(sft_dir)
    reference = AutoModelForCausalLM.from_pretrained(sft_dir)
    prompts = load_split(world_dir, "prompts_eval")["prompt"][:256]
    for estimator in ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"):
        args = PPOConfig(**{**fields, "output_dir": str(tmp_path / estimator),
                            "advantage_estimator": estimator, "use_cpu": True,
                            "disable_tqdm": True})
        trainer = PPOTrainer(AutoModelForCausalLM.from_pretrained(sft_dir), args, tok,
                             load_split(world_dir, "prompts_rl"),
                             reward=lambda p, c: [oracle_score(x) for x in c])
        trainer.train()
        report = evaluate_policy(trainer.policy, tok, prompts, seed=0, ref_model=reference)
        assert report["oracle_score"] > sft["tiny/oracle_score"] + 0.25, (estimator, report)
        assert report["kl_to_ref"] < KL_BOUND, (estimator, report["kl_to_ref"])
        history = trainer.state.log_history
        assert no_nan(history)
        logged = {k for h in history for k in h}
        assert "loss/kl_avg" in logged and "loss/value_avg" not in logged, estimator
        assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
        trainer.save_model()
        assert not (tmp_path / estimator / "value_model").exists()  # no critic, none saved


def test_one_step_rollouts_skip_the_old_log_probs_and_no_kl_skips_the_reference(world_dir,
                                                                              tmp_path):
    """A rollout that is exactly one optimizer step, with no KL in the reward, needs no
    separate old log-probs (the update's own are them: ratio 1), and with no KL at all no
    reference model is kept."""
    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    build_model("tiny", tok, seed=0).save_pretrained(tmp_path / "policy")
    trainer = make_trainer(tok, tmp_path / "policy", tmp_path / "out",
                           advantage_estimator="rloo", num_generations=4, kl_coef=0.0,
                           kl_target=None, num_ppo_epochs=1, gradient_accumulation_steps=2,
                           max_steps=2)
    assert trainer.ref_model is None
    trainer.train()
    assert trainer.state.global_step == 2
    assert not {"old_logps", "ref_logps"} & set(trainer._experience["tensors"])
    history = trainer.state.log_history
    assert [h["val/ratio"] for h in history if "val/ratio" in h] == [1.0, 1.0]
    assert [h["policy/clipfrac_avg"] for h in history if "val/ratio" in h] == [0.0, 0.0]
    assert not any("objective/kl" in h for h in history)


def test_grpo_with_prefix_sharing_trains_as_without(world_dir, tmp_path):
    """The packed groups change the layout, not the math: same rollouts, same losses, same
    weights (each rollout one minibatch, so both see the same rows per step)."""
    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    build_model("tiny", tok, seed=0).save_pretrained(tmp_path / "policy")
    runs = {}
    for shared in (False, True):
        trainer = make_trainer(tok, tmp_path / "policy", tmp_path / str(shared), **GRPO,
                               per_device_train_batch_size=16, num_train_epochs=2,
                               prefix_sharing=shared)
        trainer.train()
        runs[shared] = trainer
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in runs.values()]
    assert len(losses[0]) == 4
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-6)
    for (name, a), (_, b) in zip(runs[False].model.named_parameters(),
                                 runs[True].model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=name)


def test_dynamic_sampling_replaces_groups_whose_scores_are_all_equal(world_dir, tmp_path):
    """Prompts of even length score a constant: their groups say nothing. With
    dynamic_sampling they are replaced by groups of other prompts; rows of groups that
    stay uninformative carry no loss."""
    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    build_model("tiny", tok, seed=0).save_pretrained(tmp_path / "policy")

    def reward(prompts, completions):
        return [1.0 if len(p) % 2 == 0 else float(len(c)) for p, c in zip(prompts, completions)]

    zero_std = {}
    for dynamic in (False, True):
        trainer = make_trainer(tok, tmp_path / "policy", tmp_path / str(dynamic), reward,
                               **GRPO, dynamic_sampling=dynamic)
        experience = trainer.make_experience(0)
        zero_std[dynamic] = trainer._metrics.reduce("train", None)["frac_reward_zero_std"]
        rows = [r["prompt"] for r in trainer._iteration_rows(0)]
        live = experience["loss_mask"].sum(1) > 0
        assert live.sum() > 0
        if not dynamic:
            assert live.all()  # nothing dropped without the option
    assert zero_std[False] > 0.25 and zero_std[True] < zero_std[False], zero_std
    assert any(len(p) % 2 == 0 for p in rows)  # the fixed prompts had constant groups
