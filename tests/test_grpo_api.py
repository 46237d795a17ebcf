"""GRPOConfig/RLOOConfig as TRL users know them: every TRL 1.16 field with TRL's default,
TRL's batch arithmetic, refusals with reasons; reward functions as TRL takes them
(reward-model paths, sequence classifiers, bad outputs named). Loss parity:
test_grpo_parity.py; TRL's scripts: test_trl_scripts.py."""

import dataclasses
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import rlhf_ext
from rlhf_ext.ppo.grpo import REFUSED
from rlhf_ext.worlds.tiny import build_model, prompt_dataset

BASE = dict(output_dir="x", use_cpu=True)


@pytest.mark.parametrize("kind", ["GRPO", "RLOO"])
def test_every_trl_field_exists_with_trls_default(kind):
    import trl

    theirs_cls, ours_cls = getattr(trl, f"{kind}Config"), getattr(rlhf_ext, f"{kind}Config")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, ours = theirs_cls(**BASE), ours_cls(**BASE)
    names = {f.name for f in dataclasses.fields(theirs_cls)} - {"output_dir", "logging_dir"}
    missing = sorted(n for n in names if not hasattr(ours, n))
    assert not missing, f"{kind}Config lacks TRL's {missing}"
    differ = sorted(n for n in names - {"bf16"} if getattr(ours, n) != getattr(theirs, n))
    assert not differ, [(n, getattr(ours, n), getattr(theirs, n)) for n in differ]
    assert not ours.bf16  # docs/trl.md says why
    # and what they become in the one online trainer
    assert ours.response_length == 512 and ours.cliprange == 0.2 and ours.num_ppo_epochs == 1
    if kind == "GRPO":
        assert (ours.policy_loss, ours.loss_aggregation) == ("clip", "step_token_mean")  # dapo
        assert ours.kl_loss_coef == 0.0 and ours.kl_coef == 0.0 and ours.use_bias_correction_kl
    else:
        assert ours.kl_coef == 0.05 and ours.kl_in_reward == "score"
        assert ours.importance_sampling_level == "sequence_sum"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_fields_needing_what_is_not_here_are_refused_with_the_reason(name):
    allowed, reason = REFUSED[name]
    other = {bool: not allowed, float: 0.5, str: "other", type(None): 0.5}[type(allowed)]
    with pytest.raises(ValueError, match=name) as error:
        rlhf_ext.GRPOConfig(**BASE, **{name: other})
    assert reason.split(";")[0] in str(error.value)


def test_unsupported_loss_types_are_refused():
    for loss_type in ("luspo", "vespo", "dpo"):
        with pytest.raises(ValueError, match="loss_type"):
            rlhf_ext.GRPOConfig(**BASE, loss_type=loss_type)


def test_trls_batch_arithmetic():
    args = rlhf_ext.GRPOConfig(**BASE, per_device_train_batch_size=4, num_generations=4,
                               gradient_accumulation_steps=3)
    assert args.steps_per_generation == 3 and args.generation_batch_size == 12
    assert args.rollout_batch_size == 12  # one process: its share of the generation
    args = rlhf_ext.GRPOConfig(**BASE, per_device_train_batch_size=4, num_generations=4,
                               generation_batch_size=16)
    assert args.steps_per_generation == 4 and args.rollout_batch_size == 16
    with pytest.raises(ValueError, match="both"):
        rlhf_ext.GRPOConfig(**BASE, generation_batch_size=16, steps_per_generation=2)
    with pytest.raises(ValueError, match="divisible by the global batch size"):
        rlhf_ext.GRPOConfig(**BASE, per_device_train_batch_size=4, generation_batch_size=10)
    with pytest.raises(ValueError, match="multiple of num_generations"):
        rlhf_ext.GRPOConfig(**BASE, per_device_train_batch_size=6, num_generations=4)
    assert rlhf_ext.GRPOConfig(**BASE, scale_rewards=False).scale_rewards == "none"


@pytest.fixture(scope="module")
def paths(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_api")
    build_model("tiny", tok, seed=0).save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(root / "policy", num_labels=1)
    classifier.config.pad_token_id = tok.pad_token_id
    classifier.save_pretrained(root / "judge")
    tok.save_pretrained(root / "judge")
    return root


def grpo(paths, tok, tmp_path, reward_funcs, **kwargs):
    args = rlhf_ext.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                               disable_tqdm=True, per_device_train_batch_size=4,
                               num_generations=4, max_completion_length=6,
                               gradient_checkpointing=False, save_strategy="no", **kwargs)
    return rlhf_ext.GRPOTrainer(str(paths / "policy"), reward_funcs=reward_funcs, args=args,
                                train_dataset=prompt_dataset(6, seed=1), processing_class=tok)


def test_epochs_are_passes_over_the_prompts(paths, tok, tmp_path):
    """6 prompts, one prompt of 4 samples per generation, 2 epochs: 12 generations."""
    trainer = grpo(paths, tok, tmp_path, lambda completions, **k: [0.0] * len(completions),
                   num_train_epochs=2)
    assert trainer.args.num_train_epochs == 12


def test_a_reward_model_path_and_a_loaded_classifier_score_as_rewards(paths, tok, tmp_path):
    from rlhf_ext.reward import score

    trainer = grpo(paths, tok, tmp_path, [str(paths / "judge"),
                                          AutoModelForSequenceClassification.from_pretrained(
                                              paths / "judge", num_labels=1)],
                   max_steps=1, logging_steps=1)
    assert trainer.rewards.names == ["judge", "judge"]
    trainer.train()
    rows = [{"prompt": p} for p in ["the film was", "a story"]]
    per_func, total = trainer.rewards([r["prompt"] for r in rows], [" good", " bad"], [[5], [6]])
    judge = AutoModelForSequenceClassification.from_pretrained(paths / "judge", num_labels=1)
    expected = score(judge, tok, ["the film was", "a story"], [" good", " bad"])
    torch.testing.assert_close(per_func, torch.tensor([expected, expected]).T)
    torch.testing.assert_close(total, 2 * torch.tensor(expected))
    log = trainer.state.log_history[0]
    assert "rewards/judge/mean" in log and "rewards/judge/std" in log


def test_bad_reward_outputs_are_named_before_training(paths, tok, tmp_path):
    def too_few(completions, **kwargs):
        return [1.0]

    def not_finite(completions, **kwargs):
        return [float("nan")] * len(completions)

    def needs_a_column(completions, answer, **kwargs):
        return [1.0] * len(completions)

    with pytest.raises(ValueError, match="too_few returned 1 values for 2 completions"):
        grpo(paths, tok, tmp_path, too_few)
    with pytest.raises(ValueError, match="not_finite: score 0 is nan"):
        grpo(paths, tok, tmp_path, not_finite)
    with pytest.raises(TypeError, match="answer"):
        grpo(paths, tok, tmp_path, needs_a_column)
    with pytest.raises(ValueError, match="reward_weights has 1 values for 2"):
        grpo(paths, tok, tmp_path, [too_few, not_finite], reward_weights=[1.0])
    with pytest.raises(ValueError, match="tools"):
        rlhf_ext.GRPOTrainer(str(paths / "policy"), reward_funcs=too_few, tools=[print])


def test_a_model_object_and_no_args_work_as_in_trl(paths, tok, tmp_path, monkeypatch):
    from rlhf_ext.data import DataError

    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(paths / "policy")

    def reward(completions, **kwargs):
        return [1.0] * len(completions)

    # TRL's default max_completion_length (512) does not fit the tiny model's 256 positions
    with pytest.raises(DataError, match="row 0.*max_completion_length"):
        rlhf_ext.RLOOTrainer(model, reward_funcs=reward, train_dataset=prompt_dataset(4),
                             processing_class=tok)
    trainer = rlhf_ext.RLOOTrainer(
        model, reward_funcs=reward, train_dataset=prompt_dataset(4), processing_class=tok,
        args=rlhf_ext.RLOOConfig("policy-RLOO", use_cpu=True, max_completion_length=8))
    assert trainer.args.num_generations == 2 and trainer.args.kl_coef == 0.05
