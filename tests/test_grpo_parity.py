"""TRL's GRPOTrainer and RLOOTrainer against our presets of the one online trainer: the same
tiny policy, the same prompts and completions (generation replaced by fixed token ids in
both), the same reward function; SGD at learning rate 1 in float32, two optimizer steps on
one generation (num_iterations=2: on the second the policy has moved, so the ratios are off
1, the clips bite and the KL term has a gradient). The parameters must agree.

Both sides see micro-batches in generation order (TRL shuffles them with the global
generator, we with our own seed): micro-batch composition changes bnpo's and grpo's
normalisation, so the test fixes it on both sides.
"""

import random
import warnings

import pytest
from datasets import Dataset
from fixed_generation import MAX_NEW, patch_generation
from transformers import AutoTokenizer

import rlhf_ext
from rlhf_ext.worlds.tiny import build_model

PROMPT_TOKENS = 5
COMMON = dict(learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", report_to="none",
              use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
              gradient_checkpointing=False, seed=0, logging_steps=1, shuffle_dataset=False,
              temperature=0.9, max_completion_length=MAX_NEW, num_iterations=2, max_steps=2)


@pytest.fixture(scope="module")
def setup(world_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_parity")
    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    build_model("tiny", tok, seed=0).save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    rng = random.Random(0)  # over the sorted vocabulary: get_vocab's order differs by process
    words = [w for w in sorted(tok.get_vocab())
             if w.isalpha() and len(tok(w)["input_ids"]) == 1]
    prompts = []
    while len(prompts) < 8:  # equal token lengths: TRL's forward counts positions from 0
        text = " ".join(rng.sample(words, PROMPT_TOKENS))
        if len(tok(text, add_special_tokens=False)["input_ids"]) == PROMPT_TOKENS:
            prompts.append(text)
    return root / "policy", tok, prompts


def reward_len_and_parity(completions, completion_ids, **kwargs):
    """Varied rewards from the ids alone (same on both sides)."""
    return [len(set(ids)) / 3 + (ids[0] % 3) for ids in completion_ids]


def run_both(setup, monkeypatch, tmp_path, kind: str, ga: int,
             reward_funcs=reward_len_and_parity, **kwargs) -> dict:
    """Train both sides; assert their parameters agree; return each side's first log."""
    import trl

    path, tok, prompts = setup
    patch_generation(monkeypatch, tok)
    per_device = 8 // ga
    g = kwargs.pop("num_generations", 4)
    data = Dataset.from_dict({"prompt": prompts[: 8 // g]})
    settings = dict(COMMON, per_device_train_batch_size=per_device,
                    gradient_accumulation_steps=ga, num_generations=g, **kwargs)
    params, logs, second = {}, {}, {}
    for side, module in (("trl", trl), ("ours", rlhf_ext)):
        config = getattr(module, f"{kind}Config")
        trainer_cls = getattr(module, f"{kind}Trainer")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = config(output_dir=str(tmp_path / side), **settings)
            trainer = trainer_cls(str(path), reward_funcs=reward_funcs, args=args,
                                  train_dataset=data, processing_class=tok)
            trainer.train()
        model = trainer.policy if side == "ours" else trainer.model
        params[side] = {k: v.detach().clone() for k, v in model.named_parameters()}
        logs[side] = trainer.state.log_history[0]
        second[side] = trainer.state.log_history[1]
        assert trainer.state.global_step == settings["max_steps"]
    start = build_model("tiny", tok, seed=0).state_dict()
    moved = max((params["trl"][k] - start[k]).abs().max().item() for k in params["trl"])
    assert moved > 1e-2  # the steps did something
    worst = max((params["trl"][k] - params["ours"][k]).abs().max().item() for k in params["trl"])
    assert worst < 2e-6, (worst, moved)
    # the second step's logged KL and clip share (the policy has moved by then)
    for key in ("kl", "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean"):
        if key in second["trl"]:
            assert second["ours"][key] == pytest.approx(second["trl"][key], rel=1e-4, abs=1e-6), key
    return logs


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"]


@pytest.mark.parametrize("ga", [1, 4])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_types_match_trl(setup, monkeypatch, tmp_path, loss_type, ga):
    extra = {"epsilon_high": 5.0} if loss_type == "cispo" else {}
    run_both(setup, monkeypatch, tmp_path, "GRPO", ga, loss_type=loss_type, beta=0.04, **extra)


KNOBS = {"no_bias_correction": dict(use_bias_correction_kl=False),
         "gspo": dict(importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
         "clip_higher_dual": dict(epsilon_high=0.28, delta=1.5),
         "scale_batch": dict(scale_rewards="batch"),
         "scale_none": dict(scale_rewards="none", loss_type="dr_grpo"),
         "truncated_masked": dict(mask_truncated_completions=True),
         "entropy": dict(top_entropy_quantile=0.3, entropy_coef=0.05)}


@pytest.mark.parametrize("ga", [1, 4])
@pytest.mark.parametrize("knob", KNOBS)
def test_grpo_knobs_match_trl(setup, monkeypatch, tmp_path, knob, ga):
    run_both(setup, monkeypatch, tmp_path, "GRPO", ga, beta=0.04, **KNOBS[knob])


@pytest.mark.parametrize("ga", [1, 4])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_rloo_matches_trl(setup, monkeypatch, tmp_path, beta, ga):
    """Four steps: the second generation's KL (policy moved, reference not) is non-zero."""
    run_both(setup, monkeypatch, tmp_path, "RLOO", ga, beta=beta, num_generations=2,
             max_steps=4)


def reward_short(completion_ids, **kwargs):
    return [float(len(ids) < 4) for ids in completion_ids]


def reward_first_token(completion_ids, trainer_state, **kwargs):
    """Judges only completions starting with an even token (None for the rest)."""
    assert trainer_state.global_step == 0  # the state as the generation saw it
    return [ids[0] / 100 if ids[0] % 2 == 0 else None for ids in completion_ids]


def reward_one_row(completion_ids, **kwargs):
    """Scores one completion of the batch (the one with the largest first token): its std
    has one sample, NaN, which TRL logs as None."""
    top = max(range(len(completion_ids)), key=lambda i: completion_ids[i][0])
    return [1.0 if i == top else None for i in range(len(completion_ids))]


def test_several_reward_functions_with_weights_and_none_match_trl(setup, monkeypatch, tmp_path):
    funcs = (reward_short, reward_first_token, reward_one_row)
    logs = run_both(setup, monkeypatch, tmp_path, "GRPO", 2, loss_type="grpo",
                    reward_funcs=list(funcs), reward_weights=[1.0, 0.5, 2.0],
                    max_steps=1, num_iterations=1)
    keys = ["reward", "reward_std", "frac_reward_zero_std", "loss"] + [
        f"rewards/{f.__name__}/{s}" for f in funcs for s in ("mean", "std")]
    for key in keys:
        assert logs["ours"][key] == pytest.approx(logs["trl"][key], rel=1e-5, abs=1e-6), key
    assert logs["ours"]["rewards/reward_one_row/std"] is None
    assert 0 < logs["ours"]["rewards/reward_first_token/mean"]
