"""Nothing silent, nothing lost: non-finite values, bad reward functions and untrained reward
heads are refused early, with a message that names what to fix; no NaN model is saved."""

import math
import os

import pytest
import torch

from rlhf_ext.data import DataError
from rlhf_ext.heads import ValueModel
from rlhf_ext.ppo import PPOConfig, PPOTrainer
from rlhf_ext.preference import PreferenceConfig, PreferenceTrainer
from rlhf_ext.reward import RewardConfig, RewardTrainer, load_reward_model
from rlhf_ext.trainer_utils import NonFiniteError
from rlhf_ext.worlds.tiny import build_model, preference_pairs, prompt_dataset, unpaired_dataset

BASE = dict(report_to="none", use_cpu=True, disable_tqdm=True, seed=0)


@pytest.mark.parametrize("make, field", [
    (lambda v: PreferenceConfig(output_dir="x", beta=v), "beta"),
    (lambda v: PreferenceConfig(output_dir="x", loss_type=["sigmoid", "sft"],
                                loss_weights=[1.0, v]), "loss_weights"),
    (lambda v: PreferenceConfig(output_dir="x", loss_type=["simpo"], simpo_gamma=v),
     "simpo_gamma"),
    (lambda v: RewardConfig(output_dir="x", center_rewards_coefficient=v),
     "center_rewards_coefficient"),
    (lambda v: PPOConfig(output_dir="x", kl_coef=v), "kl_coef"),
    (lambda v: PPOConfig(output_dir="x", temperature=v), "temperature"),
])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_config_values_are_refused(make, field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        make(value)


@pytest.mark.parametrize("fields, message", [
    (dict(advantage_estimator="ppo"), "advantage_estimator must be one of gae, grpo"),
    (dict(advantage_estimator="grpo"), "set num_generations >= 2"),
    (dict(advantage_estimator="rloo", num_generations=3, rollout_batch_size=8),
     r"rollout_batch_size \(8\) counts samples: it must be a multiple of num_generations \(3\)"),
    (dict(advantage_estimator="grpo", num_generations=4, whiten_rewards=True),
     "whiten_rewards is a gae option"),
    (dict(loss_aggregation="sum"), "loss_aggregation must be one of token_mean"),
    (dict(kl_loss_estimator="k4"), "kl_loss_estimator must be k1, k2 or k3"),
    (dict(kl_loss_coef=-0.1), "kl_coef and kl_loss_coef must be >= 0"),
])
def test_online_rl_settings_are_checked_at_config_time(fields, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(output_dir="x", **fields)


def test_gae_needs_a_value_model_and_critic_free_drops_one(policy_dir, tok, tmp_path):
    policy = build_model("tiny", tok, seed=0)
    args = PPOConfig(output_dir=str(tmp_path), rollout_batch_size=4,
                     per_device_train_batch_size=2, response_length=4, **BASE)
    reward = lambda p, c: [0.0] * len(c)  # noqa: E731
    with pytest.raises(ValueError, match="advantage_estimator='gae' learns a value model"):
        PPOTrainer(policy, args, tok, prompt_dataset(8), reward=reward)
    args = PPOConfig(output_dir=str(tmp_path), rollout_batch_size=4, num_generations=2,
                     advantage_estimator="rloo", per_device_train_batch_size=2,
                     response_length=4, **BASE)
    value = ValueModel.from_backbone(str(policy_dir), seed=1)
    with pytest.warns(UserWarning, match="uses no value model"):
        trainer = PPOTrainer(policy, args, tok, prompt_dataset(8), reward=reward,
                             value_model=value)
    assert trainer.value_model is None
    assert not any(p is q for p in trainer.model.parameters() for q in value.parameters())


def test_nan_margin_names_its_row(policy_dir, tok, tmp_path):
    pairs = preference_pairs(4, seed=0).add_column("margin", [0.5, math.nan, 0.0, 1.0])
    with pytest.raises(DataError, match="row 1, column 'margin'"):
        RewardTrainer(str(policy_dir), args=RewardConfig(output_dir=str(tmp_path), **BASE),
                      train_dataset=pairs, processing_class=tok)


def test_a_nan_loss_stops_training_and_nothing_is_saved(policy_dir, tok, tmp_path):
    args = PreferenceConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                            max_length=64, save_strategy="steps", save_steps=1, **BASE)
    trainer = PreferenceTrainer(str(policy_dir), args=args, train_dataset=preference_pairs(16),
                                processing_class=tok)
    with torch.no_grad():  # a diverged weight: every log-prob, hence the loss, is NaN
        trainer.model.model.norm.weight[0] = math.nan
    with pytest.raises(NonFiniteError, match="step 1: the loss is nan"):
        trainer.train()
    assert not list(tmp_path.glob("checkpoint-*"))
    with pytest.raises(NonFiniteError, match="parameter model.norm.weight holds NaN"):
        trainer.save_model()
    assert not (tmp_path / "model.safetensors").exists()


def test_the_save_guard_reads_the_gathered_weights_of_a_sharded_model(tok):
    """Under ZeRO-3 and FSDP a process holds slices: the guard checks the whole weights the
    Trainer gathered for the save (``state_dict``), and never reads a slice as the whole
    (reading a sharded one alone is a collective that waits forever)."""
    from rlhf_ext.trainer_utils import check_finite_weights

    model = build_model("tiny", tok, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.norm.weight"][0] = math.nan  # diverged, as gathered from every process
    with pytest.raises(NonFiniteError, match="parameter model.norm.weight holds NaN"):
        check_finite_weights(model, "out", state)
    check_finite_weights(model, "out", {k: v for k, v in state.items() if "norm" not in k})
    model.model.norm.weight.ds_id = 0  # a ZeRO-3 placeholder: not in the state dict, skipped
    with torch.no_grad():
        model.model.norm.weight[0] = math.nan
    check_finite_weights(model, "out", {})
    del model.model.norm.weight.ds_id  # a whole local weight: checked where it is
    with pytest.raises(NonFiniteError, match="parameter model.norm.weight holds NaN"):
        check_finite_weights(model, "out", {})


def ppo(policy_dir, tok, tmp_path, reward):
    policy = build_model("tiny", tok, seed=0)
    value = ValueModel.from_backbone(str(policy_dir), seed=1)
    args = PPOConfig(output_dir=str(tmp_path), rollout_batch_size=4,
                     per_device_train_batch_size=2, response_length=4, **BASE)
    return PPOTrainer(policy, args, tok, prompt_dataset(8), reward=reward, value_model=value)


@pytest.mark.parametrize("reward, error, message", [
    (lambda p, c: [0.5], ValueError, "returned 1 values for 2 completions"),
    (lambda p, c: 0.5, ValueError, "returned float for 2 completions"),
    (lambda p, c: ["good"] * len(c), TypeError, "score 0 is 'good'"),
    (lambda p, c: [1.0, math.nan], ValueError, "score 1 is nan"),
])
def test_reward_functions_are_checked_before_sampling(policy_dir, tok, tmp_path, reward, error,
                                                     message):
    with pytest.raises(error, match=f"reward function .*{message}"):
        ppo(policy_dir, tok, tmp_path, reward)


def test_a_checkpoint_without_a_reward_head_is_not_a_reward_model(policy_dir):
    with pytest.raises(ValueError, match="without a trained reward head.*new_head=True"):
        load_reward_model(str(policy_dir))
    fresh = load_reward_model(str(policy_dir), new_head=True)
    assert fresh.score.weight.shape == (1, fresh.config.backbone_config.hidden_size)


def test_tensor_and_numpy_scores_are_accepted():
    import numpy as np

    from rlhf_ext.ppo.reward_funcs import checked_values

    assert checked_values("f", torch.full((2,), 0.25), ["x", "y"]) == [0.25, 0.25]
    assert checked_values("f", list(np.float32([1, -1])), ["x", "y"]) == [1.0, -1.0]


def test_a_hub_token_argument_is_never_written(policy_dir, tok, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    secret = "hf_guard_test_secret_0123456789"
    args = PreferenceConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                            max_length=64, save_strategy="steps", save_steps=1,
                            hub_token=secret, **BASE)
    trainer = PreferenceTrainer(str(policy_dir), args=args, train_dataset=preference_pairs(8),
                                processing_class=tok)
    trainer.train()
    trainer.save_model()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in written)
    assert not [p for p in written if secret.encode() in p.read_bytes()]
    assert args.hub_token is None and os.environ["HF_TOKEN"] == secret


def test_prefix_sharing_refuses_an_attention_without_dense_masks(policy_dir, tok, tmp_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(policy_dir, attn_implementation="sdpa")
    model.config._attn_implementation = "flash_attention_2"  # what a GPU user may load
    args = PreferenceConfig(output_dir=str(tmp_path), prefix_sharing=True, max_length=64, **BASE)
    with pytest.raises(ValueError, match="prefix_sharing needs .* uses 'flash_attention_2'.*"
                                         "attn_implementation='sdpa'"):
        PreferenceTrainer(model, args=args, train_dataset=preference_pairs(4),
                          processing_class=tok)


@pytest.mark.parametrize("attention, fields, expected, packed", [
    ("sdpa", {}, True, True),                 # all pairs in one row, attended per pair
    ("eager", {}, True, False),               # one row per pair: eager needs a dense mask
    ("flash_attention_2", {}, False, False),  # a GPU user's attention: padded rows, no error
    ("sdpa", {"loss_type": "kto"}, False, True),     # unpaired: packed, nothing shared
    ("sdpa", {"truncation_mode": "keep_end"}, False, True),
    ("sdpa", {"padding_free": False}, True, False),
    ("eager", {"padding_free": True}, True, True),
    ("sdpa", {"prefix_sharing": False, "padding_free": True}, False, True),
])
def test_prefix_sharing_is_on_by_default_where_it_applies(policy_dir, tok, tmp_path,
                                                          attention, fields, expected, packed):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(policy_dir, attn_implementation="sdpa")
    model.config._attn_implementation = attention
    args = PreferenceConfig(output_dir=str(tmp_path), max_length=64, **fields, **BASE)
    data = unpaired_dataset(4, seed=0) if fields.get("loss_type") == "kto" \
        else preference_pairs(4)
    trainer = PreferenceTrainer(model, args=args, train_dataset=data, processing_class=tok)
    assert trainer.args.prefix_sharing is expected and args.gradient_checkpointing
    assert trainer.args.padding_free is packed
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert ("segment_ids" in batch) is expected
    rows = 1 if packed else 4 if expected or fields.get("loss_type") == "kto" else 8
    assert batch["input_ids"].shape[0] == rows


def turn(role, content):
    return {"role": role, "content": content}


GOOD = {"prompt": [turn("user", "Review a film.")], "chosen": [turn("assistant", "Lovely.")],
        "rejected": [turn("assistant", "Dull.")]}


@pytest.mark.parametrize("bad, match", [
    ({"chosen": [turn("bot", "Lovely.")]},
     r"row 1, column 'chosen', message 0: unknown role 'bot'.*'assistant'"),
    ({"rejected": [turn("assistant", None)]},
     r"row 1, column 'rejected', message 0 \(assistant\): content is None, not text"),
    ({"prompt": [{"role": "user", "text": "hi"}]},
     r"row 1, column 'prompt', message 0: keys \['role', 'text'\].*'content'"),
    ({"chosen": [turn("user", "Lovely.")]},
     r"row 1, column 'chosen': the completion ends with a 'user' turn.*'assistant'"),
    ({"chosen": [turn("assistant", "  ")]}, r"row 1, column 'chosen': the messages are empty"),
])
def test_conversations_are_checked_turn_by_turn(bad, match):
    from datasets import Dataset

    from rlhf_ext.data import validate_preference_dataset
    rows = [GOOD, {**GOOD, **bad}]
    if "prompt" in bad:  # a key rename changes the column's type: one row alone
        rows = [{**GOOD, **bad}]
        match = match.replace("row 1", "row 0")
    with pytest.raises(DataError, match=match):
        validate_preference_dataset(Dataset.from_list(rows), True, ["sigmoid"])


def test_a_conversational_prompt_with_string_completions_is_refused():
    from datasets import Dataset

    from rlhf_ext.data import validate_preference_dataset
    rows = Dataset.from_list([{"prompt": GOOD["prompt"], "completion": "Lovely.", "label": True}])
    with pytest.raises(DataError, match=r"row 0, column 'completion' is a string but the prompt "
                                        r"is a conversation. Give both as messages"):
        validate_preference_dataset(rows, False, ["kto"])


def test_ppo_prompts_get_the_same_turn_checks():
    from datasets import Dataset

    from rlhf_ext.data import validate_prompt_dataset
    rows = Dataset.from_list([{"prompt": [turn("user", "Hi.")]},
                              {"prompt": [turn("system", "Be kind."), turn("human", "Hi.")]}])
    with pytest.raises(DataError, match=r"row 1, column 'prompt', message 1: unknown role 'human'"):
        validate_prompt_dataset(rows)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_type=["ipo"], label_smoothing=0.1),
     r"label_smoothing=0.1 is ignored by loss \['ipo'\]: set it to 0, or use .*sigmoid"),
    (dict(loss_type=["simpo"], simpo_gamma=-0.5), r"simpo_gamma .* must be >= 0, got -0.5"),
])
def test_values_a_loss_would_ignore_or_misread_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreferenceConfig(output_dir="x", **kwargs)
    # smoothing that one of several losses reads is accepted
    PreferenceConfig(output_dir="x", loss_type=["sigmoid", "sft"], label_smoothing=0.1)


def test_degenerate_pairs_are_counted(policy_dir, tok, tmp_path):
    pairs = preference_pairs(6, seed=0).to_list()
    pairs[1]["rejected"] = pairs[1]["chosen"]
    pairs[4]["rejected"] = pairs[4]["chosen"]
    from datasets import Dataset
    args = PreferenceConfig(output_dir=str(tmp_path), max_length=64, **BASE)
    with pytest.warns(UserWarning, match="2 of 6 pairs have identical chosen and rejected"):
        PreferenceTrainer(str(policy_dir), args=args, train_dataset=Dataset.from_list(pairs),
                          processing_class=tok)
    # a max_length that keeps no completion token makes every pair identical
    prompt = max(len(tok(p)["input_ids"]) for p in preference_pairs(6, seed=0)["prompt"])
    args = PreferenceConfig(output_dir=str(tmp_path), max_length=prompt + 1, **BASE)
    with pytest.warns(UserWarning, match=f"pairs become identical once cut to "
                                         f"max_length={prompt + 1}"):
        PreferenceTrainer(str(policy_dir), args=args, train_dataset=preference_pairs(6, seed=0),
                          processing_class=tok)


def test_kto_with_one_label_warns(policy_dir, tok, tmp_path):
    data = unpaired_dataset(8, seed=0).map(lambda _: {"label": True})
    args = PreferenceConfig(output_dir=str(tmp_path), loss_type=["kto"], max_length=64, **BASE)
    with pytest.warns(UserWarning, match="8 desirable and 0 undesirable rows"):
        PreferenceTrainer(str(policy_dir), args=args, train_dataset=data, processing_class=tok)


def test_a_tokenizer_beyond_the_vocabulary_is_refused(tok, tmp_path):
    small = build_model("tiny", tok, vocab_size=len(tok) - 5)  # a smaller vocabulary
    args = PreferenceConfig(output_dir=str(tmp_path), max_length=64, **BASE)
    with pytest.raises(DataError, match=rf"row \d+, column '\w+_ids': token id \d+ is outside "
                                        rf"the model's vocabulary of {len(tok) - 5}"):
        PreferenceTrainer(small, args=args, train_dataset=preference_pairs(16),
                          processing_class=tok)


def test_sequences_beyond_the_model_positions_are_refused(tok, tmp_path):
    positions = 32
    build_model("tiny", tok, max_position_embeddings=positions).save_pretrained(tmp_path / "m")
    data = preference_pairs(4).map(lambda r, i: {"chosen": r["chosen"] * (8 if i == 2 else 1)},
                                   with_indices=True)
    args = RewardConfig(output_dir=str(tmp_path), max_length=None, **BASE)
    with pytest.raises(DataError, match=rf"row 2: \d+ tokens, more than the model's "
                                        rf"{positions} positions. Set max_length={positions}"):
        RewardTrainer(str(tmp_path / "m"), args=args, train_dataset=data, processing_class=tok)
    args = RewardConfig(output_dir=str(tmp_path), max_length=positions, **BASE)
    RewardTrainer(str(tmp_path / "m"), args=args, train_dataset=data, processing_class=tok)


def test_a_prompt_column_under_another_name_is_not_dropped_silently(policy_dir, tok, tmp_path):
    data = preference_pairs(4).rename_column("prompt", "question")
    args = PreferenceConfig(output_dir=str(tmp_path), max_length=64, **BASE)
    with pytest.raises(DataError, match=r"no 'prompt' column, and in \d+ of 4 rows.*"
                                        r"column\(s\) \['question'\] are dropped. Rename the "
                                        r"prompt column to 'prompt'"):
        PreferenceTrainer(str(policy_dir), args=args, train_dataset=data, processing_class=tok)


def test_the_newest_complete_checkpoint_is_chosen(policy_dir, tok, tmp_path):
    from safetensors.torch import load_file

    from rlhf_ext.trainer_utils import checkpoint_problem, resolve_checkpoint

    def trainer(steps):
        args = PreferenceConfig(output_dir=str(tmp_path), max_steps=steps, save_steps=1,
                                per_device_train_batch_size=4, max_length=64, **BASE)
        return PreferenceTrainer(str(policy_dir), args=args, train_dataset=preference_pairs(16),
                                 processing_class=tok)

    trainer(3).train()
    after_three = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    (tmp_path / "checkpoint-3" / "trainer_state.json").unlink()  # killed before the state
    weights = tmp_path / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # killed while writing the weights
    assert checkpoint_problem(str(tmp_path / "checkpoint-2")) == \
        "model.safetensors is unreadable (SafetensorError)"
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint .*checkpoint-3: no "
                                         "trainer_state.json"):
        assert resolve_checkpoint("true", str(tmp_path)) == str(tmp_path / "checkpoint-1")
    with pytest.raises(ValueError, match="checkpoint-2' is not a complete checkpoint: "
                                         "model.safetensors is unreadable.*Pass true"):
        resolve_checkpoint(str(tmp_path / "checkpoint-2"), str(tmp_path))
    assert resolve_checkpoint("false", str(tmp_path)) is None
    assert resolve_checkpoint(True, str(tmp_path / "empty")) is None  # nothing yet: fresh

    resumed = trainer(3)
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        resumed.train(resume_from_checkpoint=True)  # steps 2 and 3 again, from checkpoint-1
    for name, value in resumed.model.state_dict().items():
        if name in after_three:
            torch.testing.assert_close(value, after_three[name], rtol=0, atol=0)


def test_a_non_finite_gradient_norm_stops_before_the_step(policy_dir, tok, tmp_path):
    args = PreferenceConfig(output_dir=str(tmp_path), max_steps=2, save_steps=1,
                            per_device_train_batch_size=4, max_length=64, **BASE)
    trainer = PreferenceTrainer(str(policy_dir), args=args, train_dataset=preference_pairs(16),
                                processing_class=tok)
    weight = trainer.model.model.norm.weight
    before = weight.detach().clone()
    weight.register_hook(lambda g: g * math.inf)  # an overflow in backward, finite loss
    with pytest.raises(NonFiniteError, match="step 1: the gradient norm is (inf|nan) while the "
                                             "loss was finite"):
        trainer.train()
    assert torch.equal(weight.detach(), before) and not list(tmp_path.glob("checkpoint-*"))


def test_sft_stops_on_a_nan_loss(policy_dir, tok, tmp_path):
    from trl import SFTConfig

    from rlhf_ext.sft import SFTTrainer
    from rlhf_ext.worlds.tiny import sft_dataset
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, save_steps=1, max_length=64,
                     per_device_train_batch_size=4, **BASE)
    trainer = SFTTrainer(str(policy_dir), args=args, train_dataset=sft_dataset(16),
                         processing_class=tok)
    with torch.no_grad():
        trainer.model.model.norm.weight[0] = math.nan
    with pytest.raises(NonFiniteError, match="step 1: the loss is nan"):
        trainer.train()
    with pytest.raises(NonFiniteError, match="model.norm.weight holds NaN"):
        trainer.save_model()
    assert not (tmp_path / "model.safetensors").exists()


def test_the_torch_floor_is_what_transformers_needs():
    """pyproject must not admit a torch that transformers refuses, or one whose torch.load
    unpickles anything by default (before 2.6)."""
    import re
    from importlib.metadata import requires
    from pathlib import Path

    from packaging.version import Version
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    ours = Version(re.search(r'"torch>=([\d.]+)"', pyproject).group(1))
    theirs = [Version(m.group(1)) for r in requires("transformers")
              if (m := re.match(r"torch>=([\d.]+); extra == \"torch\"", r))]
    assert theirs and ours >= max(theirs) and ours >= Version("2.6")


@pytest.mark.parametrize("policy_kwargs, response_length, match", [
    (dict(vocab_size=100), 4, r"row 0, column 'prompt': token id \d+ is outside the model's "
                              r"vocabulary of 100"),
    (dict(max_position_embeddings=16), 12, r"row \d+, column 'prompt': \d+ tokens plus "
                                           r"response_length=12 exceed the model's 16 positions"),
])
def test_ppo_prompts_must_fit_the_policy(tok, tmp_path, policy_kwargs, response_length, match):
    policy = build_model("tiny", tok, seed=0, **policy_kwargs)
    args = PPOConfig(output_dir=str(tmp_path), rollout_batch_size=4,
                     per_device_train_batch_size=2, response_length=response_length, **BASE)
    with pytest.raises(DataError, match=match):
        PPOTrainer(policy, args, tok, prompt_dataset(8), reward=lambda p, c: [0.0] * len(c),
                   value_model=None)


def test_ppo_under_fsdp_refuses_what_it_cannot_shard_yet(tok, tmp_path, monkeypatch):
    """Under FSDP PPO samples with transformers from whole copies of the policy: vLLM is
    refused at start, as are 4-bit and single-base policies."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets
    args = PPOConfig(output_dir=str(tmp_path), rollout_batch_size=4,
                     per_device_train_batch_size=2, use_vllm=True, **BASE)
    with pytest.raises(ValueError, match="PPOTrainer under FSDP samples with transformers "
                                         "\\(not vLLM\\)"):
        PPOTrainer(build_model("tiny", tok, seed=0), args, tok, prompt_dataset(8),
                   reward=lambda p, c: [0.0] * len(c))


@pytest.mark.parametrize("vocab_size, seed, match", [
    (320, 0, r"the tokenizer has 512 tokens and the reward model's embeddings 320 rows"),
    (512, 1, r"the reward model was saved with another tokenizer \(.*other\)"),
])
def test_a_reward_model_on_another_tokenizer_needs_its_own(tok, tmp_path, vocab_size, seed,
                                                           match):
    """A smaller vocabulary died in torch's embedding (IndexError); one of the same size
    with other tokens scored every completion as the wrong ids, silently."""
    from rlhf_ext.heads import RewardModel
    from rlhf_ext.worlds.tiny import build_tokenizer

    other = build_tokenizer(vocab_size=vocab_size, seed=seed)
    assert len(tok) == 512 and len(other) == vocab_size
    build_model("tiny", other, seed=1).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    reward = RewardModel.from_backbone(str(tmp_path / "other"))
    args = PPOConfig(output_dir=str(tmp_path / "out"), rollout_batch_size=4, num_generations=2,
                     advantage_estimator="rloo", per_device_train_batch_size=2,
                     response_length=4, max_steps=2, **BASE)
    policy = build_model("tiny", tok, seed=0)
    with pytest.raises(ValueError, match=rf"cannot read the policy's tokens: {match}.*"
                                         r"reward_tokenizer="):
        PPOTrainer(policy, args, tok, prompt_dataset(8), reward=reward)
    trainer = PPOTrainer(policy, args, tok, prompt_dataset(8), reward=reward,
                         reward_tokenizer=other)
    trainer.train()  # completions re-tokenized with the reward model's own tokenizer
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("where, match", [
    ("file", r"output_dir .*a_file is a file, not a folder"),
    ("/proc/self", r"output_dir /proc/self cannot be written"),
])
def test_an_output_dir_that_cannot_be_written_is_refused_before_loading(tmp_path, tok, where,
                                                                       match):
    """It used to fail only at the first save (an unwritable folder) or with a raw
    FileExistsError after loading and tokenizing (a file)."""
    if where == "file":
        where = tmp_path / "a_file"
        where.write_text("not a folder")
    reward = lambda p, c: [0.0] * len(c)  # noqa: E731
    makers = [
        lambda: PreferenceTrainer("no/such/model", args=PreferenceConfig(
            output_dir=str(where), **BASE), train_dataset=preference_pairs(4)),
        lambda: RewardTrainer("no/such/model", args=RewardConfig(output_dir=str(where), **BASE),
                              train_dataset=preference_pairs(4)),
        lambda: PPOTrainer(build_model("tiny", tok), PPOConfig(
            output_dir=str(where), advantage_estimator="rloo", num_generations=2, **BASE),
            tok, prompt_dataset(4), reward=reward),
    ]
    for make in makers:  # refused before the model path is even looked at
        with pytest.raises(ValueError, match=match):
            make()


def test_saved_files_get_the_users_usual_permissions(policy_dir, tok, tmp_path):
    """transformers writes model.safetensors through a temporary file, 0600."""
    old = os.umask(0o022)
    try:
        args = PreferenceConfig(output_dir=str(tmp_path), max_steps=1, save_strategy="steps",
                                save_steps=1, per_device_train_batch_size=4, max_length=64,
                                **BASE)
        trainer = PreferenceTrainer(str(policy_dir), args=args, train_dataset=preference_pairs(8),
                                    processing_class=tok)
        trainer.train()
        trainer.save_model()
    finally:
        os.umask(old)
    for path in (tmp_path / "model.safetensors", tmp_path / "checkpoint-1" / "model.safetensors",
                 tmp_path / "checkpoint-1" / "optimizer.pt"):
        assert os.stat(path).st_mode & 0o777 == 0o644, path


def test_a_save_that_cannot_be_written_names_the_folder_and_the_space(policy_dir, tmp_path):
    """A full disk gave 'enforce fail at inline_container.cc ... unexpected pos', naming
    nothing. Here a real process is limited to 64 KiB per file (RLIMIT_FSIZE, as a full disk
    refuses the write): the first checkpoint's weights cannot be written."""
    import subprocess
    import sys

    script = f"""
import resource, signal
from transformers import AutoTokenizer
from rlhf_ext.preference import PreferenceConfig, PreferenceTrainer
from rlhf_ext.worlds.tiny import preference_pairs
tok = AutoTokenizer.from_pretrained({str(policy_dir)!r})
args = PreferenceConfig(output_dir={str(tmp_path / "out")!r}, max_steps=2, save_steps=1,
                        save_strategy="steps", per_device_train_batch_size=4, max_length=64,
                        report_to="none", use_cpu=True, disable_tqdm=True)
trainer = PreferenceTrainer({str(policy_dir)!r}, args=args, train_dataset=preference_pairs(8),
                            processing_class=tok)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
trainer.train()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "SaveError: saving to" in proc.stderr and "checkpoint-1 failed" in proc.stderr
    assert "Free space there:" in proc.stderr and "resume: the cut checkpoint is skipped" in \
        proc.stderr


def test_several_gpus_without_a_launcher_are_refused_before_loading(policy_dir, tok, tmp_path,
                                                                      monkeypatch):
    """transformers falls back to nn.DataParallel when one process sees several GPUs; it
    splits the rows of a batch but copies the span layouts whole. No GPU here: the count
    the Trainer reads is set to 2."""
    from transformers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    args = PreferenceConfig(output_dir=str(tmp_path), max_steps=1, **BASE)
    with pytest.raises(ValueError, match="nn.DataParallel.*accelerate launch --num_processes 2"):
        PreferenceTrainer(str(policy_dir), args=args, train_dataset=preference_pairs(4),
                          processing_class=tok)
    assert not any(tmp_path.iterdir())


def test_precision_defaults_follow_the_device():
    from rlhf_ext.trainer_utils import device_precision

    # (use_cpu, fp16, cuda, bf16_supported, capability) -> (bf16, tf32)
    assert device_precision(False, False, True, True, (9, 0)) == (True, True)    # H100
    assert device_precision(False, False, True, False, (7, 0)) == (False, None)  # V100
    assert device_precision(False, True, True, True, (8, 0)) == (False, True)    # fp16 asked
    assert device_precision(True, False, True, True, (8, 0)) == (False, None)    # use_cpu
    assert device_precision(False, False, False, False, None) == (False, None)   # a CPU
    args = PPOConfig(output_dir="x", **BASE)
    assert args.bf16 is False and args.tf32 is None  # here: a CPU
    assert PPOConfig(output_dir="x", bf16=True, **BASE).bf16  # an explicit value stays


OFFLOAD = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}


@pytest.mark.parametrize("optim, config, refused", [
    ("AdamW", OFFLOAD, False), ("Adam", OFFLOAD, False), ("Adagrad", OFFLOAD, False),
    ("SGD", OFFLOAD, True), ("RMSprop", OFFLOAD, True),
    ("SGD", {**OFFLOAD, "optimizer": {"type": "SGD"}}, False),       # DeepSpeed's own
    ("SGD", {**OFFLOAD, "zero_force_ds_cpu_optimizer": False}, False),  # kept as it is
    ("SGD", {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, False),
    ("SGD", None, False),                                                # no DeepSpeed
])
def test_zero_offload_refuses_an_optimizer_accelerate_would_turn_into_adam(optim, config,
                                                                            refused):
    """With the optimizer's state offloaded, accelerate maps torch's AdamW, Adam and Adagrad
    to DeepSpeed's CPU versions and every other optimizer to its CPU Adam: those are
    refused, unless the DeepSpeed config names its optimizer or keeps the client's."""
    from rlhf_ext.sharding import offload_optimizer_refusal

    optimizer = getattr(torch.optim, optim)([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    why = offload_optimizer_refusal(config, optimizer)
    assert (why is not None) == refused
    if refused:
        assert why.startswith(f"the optimizer is {optim}, but with offload_optimizer")
