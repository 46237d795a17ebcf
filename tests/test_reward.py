"""Reward training: loss and metrics by hand, parity with TRL, scoring, the tiny world."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaForSequenceClassification

from rlhf_ext.data import DataError
from rlhf_ext.heads import RewardModel
from rlhf_ext.reward import RewardConfig, RewardTrainer, reward_loss, score
from rlhf_ext.worlds.tiny import build_model, preference_pairs

COMMON = dict(learning_rate=0.0, max_steps=1, per_device_train_batch_size=8, logging_steps=1,
              report_to="none", use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
              seed=0, max_length=128)


@pytest.fixture(scope="module")
def lm_dir(world_dir, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    path = tmp_path_factory.mktemp("rmlm") / "lm"
    build_model("tiny", tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_reward_loss_by_hand():
    c, r = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    m = torch.tensor([0.5, 0.0, 1.0])
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    assert reward_loss(c, r).item() == pytest.approx(-(ls(1) + ls(-1) + ls(-0.5)) / 3)
    assert reward_loss(c, r, m).item() == pytest.approx(-(ls(0.5) + ls(-1) + ls(-1.5)) / 3)
    center = (1.0 ** 2 + 0.0 ** 2 + 4.5 ** 2) / 3
    assert reward_loss(c, r, None, 0.01).item() == pytest.approx(
        -(ls(1) + ls(-1) + ls(-0.5)) / 3 + 0.01 * center)


def test_trainer_loss_and_metrics_by_hand(lm_dir, tmp_path):
    data = preference_pairs(8, seed=1).add_column("margin", [0.1 * i for i in range(8)])
    tok = AutoTokenizer.from_pretrained(lm_dir)
    trainer = RewardTrainer(str(lm_dir), args=RewardConfig(
        output_dir=str(tmp_path), center_rewards_coefficient=0.05, **COMMON),
        train_dataset=data, processing_class=tok)
    trainer.train()
    log = trainer.state.log_history[0]
    rewards = score(trainer.model, tok, list(data["prompt"]) * 2,
                    list(data["chosen"]) + list(data["rejected"]))
    chosen, rejected = rewards[:8], rewards[8:]
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    loss = -sum(ls(c - r - 0.1 * i) for i, (c, r) in enumerate(zip(chosen, rejected))) / 8
    loss += 0.05 * sum((c + r) ** 2 for c, r in zip(chosen, rejected)) / 8
    assert log["loss"] == pytest.approx(loss, rel=1e-5)
    assert log["accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 8)
    assert log["margin"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / 8, rel=1e-5)
    assert log["mean_reward"] == pytest.approx(sum(rewards) / 16, rel=1e-5, abs=1e-6)


def test_parity_with_trl_reward_trainer(lm_dir, tmp_path):
    """TRL's RewardTrainer on LlamaForSequenceClassification with the same backbone and
    head weights (neither head has a bias) gives the same loss at lr 0."""
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer as TRLRewardTrainer

    data = preference_pairs(8, seed=2)
    tok = AutoTokenizer.from_pretrained(lm_dir)
    ours = RewardModel.from_backbone(str(lm_dir), seed=4)
    theirs = LlamaForSequenceClassification.from_pretrained(lm_dir, num_labels=1)
    theirs.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        theirs.score.weight.copy_(ours.score.weight)
        torch.testing.assert_close(theirs.model.embed_tokens.weight, ours.model.embed_tokens.weight)
    trl_trainer = TRLRewardTrainer(model=theirs, processing_class=tok, train_dataset=data,
                                   args=TRLRewardConfig(output_dir=str(tmp_path / "trl"),
                                                        gradient_checkpointing=False, **COMMON))
    trl_trainer.train()
    mine = RewardTrainer(ours, args=RewardConfig(output_dir=str(tmp_path / "ours"), **COMMON),
                         train_dataset=data, processing_class=tok)
    mine.train()
    a, b = mine.state.log_history[0], trl_trainer.state.log_history[0]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
    assert a["margin"] == pytest.approx(b["margin"], rel=1e-4, abs=1e-5)
    assert a["accuracy"] == b["accuracy"]


def test_reward_data_validated_like_preference(lm_dir, tmp_path):
    bad = Dataset.from_dict({"prompt": ["a"], "chosen": [" x ."], "rejected": [""]})
    with pytest.raises(DataError, match="row 0, column 'rejected': empty text"):
        RewardTrainer(str(lm_dir), args=RewardConfig(output_dir=str(tmp_path), **COMMON),
                      train_dataset=bad)


def test_tiny_world_reward_model(reward_run):
    """Trained on oracle-labelled pairs: held-out accuracy and agreement with the oracle.
    (The oracle itself reaches about 0.92 on these noisy Bradley-Terry labels.)"""
    out, summary = reward_run
    assert summary["eval_accuracy"] >= 0.85, summary["eval_accuracy"]
    assert summary["tiny/spearman_oracle"] >= 0.8, summary["tiny/spearman_oracle"]
    from transformers import AutoModelForSequenceClassification

    assert type(AutoModelForSequenceClassification.from_pretrained(out)).__name__ == \
        "LlamaForSequenceClassification"  # saved as transformers' own classifier
    card = (out / "README.md").read_text()
    assert "reward-model" in card and "AutoModelForSequenceClassification.from_pretrained" in card


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_transformers_sequence_classifier_as_trl_documents_it(lm_dir, tmp_path, lora):
    """TRL's way: RewardTrainer(AutoModelForSequenceClassification(path, num_labels=1)).
    The same loss as TRL's trainer at lr 0; trained, it saves in transformers' own format
    (plain AutoModelForSequenceClassification reads it) or as a LoRA adapter, and
    load_reward_model gives back the same scores either way."""
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer as TRLRewardTrainer

    from rlhf_ext.reward import load_reward_model

    data = preference_pairs(8, seed=2)
    tok = AutoTokenizer.from_pretrained(lm_dir)

    def classifier():
        torch.manual_seed(3)  # the same fresh head each time
        return AutoModelForSequenceClassification.from_pretrained(lm_dir, num_labels=1)

    peft = LoraConfig(r=4, target_modules="all-linear") if lora else None
    theirs = TRLRewardTrainer(model=classifier(), processing_class=tok, train_dataset=data,
                              args=TRLRewardConfig(output_dir=str(tmp_path / "trl"),
                                                   gradient_checkpointing=False, **COMMON))
    theirs.train()
    mine = RewardTrainer(classifier(), args=RewardConfig(output_dir=str(tmp_path / "a"), **COMMON),
                         train_dataset=data, processing_class=tok, peft_config=peft)
    mine.train()
    assert mine.state.log_history[0]["loss"] == pytest.approx(
        theirs.state.log_history[0]["loss"], rel=1e-5, abs=1e-5)

    trained = RewardTrainer(classifier(), train_dataset=data, processing_class=tok,
                            peft_config=peft, args=RewardConfig(
                                output_dir=str(tmp_path / "b"),
                                **{**COMMON, "learning_rate": 1e-2, "max_steps": 2}))
    trained.train()
    trained.save_model(str(tmp_path / "saved"))
    prompts, completions = list(data["prompt"]), list(data["chosen"])
    want = score(trained.model, tok, prompts, completions)
    assert want != score(classifier(), tok, prompts, completions)  # training moved them
    again = score(load_reward_model(str(tmp_path / "saved")), tok, prompts, completions)
    assert again == pytest.approx(want, abs=1e-5)
    if not lora:
        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
        assert type(plain).__name__ == "LlamaForSequenceClassification"
        assert score(plain, tok, prompts, completions) == pytest.approx(want, abs=1e-5)


def test_a_classifier_with_two_labels_is_refused(lm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(lm_dir, num_labels=2)
    with pytest.raises(ValueError, match=r"num_labels=2\) is not a reward model"):
        RewardTrainer(model, args=RewardConfig(output_dir=str(tmp_path), **COMMON),
                      train_dataset=preference_pairs(4), processing_class=AutoTokenizer
                      .from_pretrained(lm_dir))


@pytest.mark.parametrize("attention, packed", [("sdpa", False), ("eager", False),
                                               ("sdpa", True)])
def test_prefix_sharing_gives_the_padded_loss_and_gradients(lm_dir, tmp_path, attention,
                                                            packed):
    """One row per pair [prompt | chosen | rejected] (or, packed, all 12 pairs in one row
    without padding) against two padded rows per pair, on 12 pairs of many prompt and
    completion lengths: the same loss, rewards and gradient."""
    data = preference_pairs(12, seed=7)
    tok = AutoTokenizer.from_pretrained(lm_dir)
    model = RewardModel.from_backbone(str(lm_dir), seed=1, attn_implementation=attention)
    results = []
    for sharing in (False, True):
        trainer = RewardTrainer(model, train_dataset=data, processing_class=tok,
                                args=RewardConfig(output_dir=str(tmp_path), **COMMON,
                                                  prefix_sharing=sharing,
                                                  padding_free=sharing and packed))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(12)])
        assert ("segment_ids" in batch) == sharing
        assert batch["input_ids"].shape[0] == (24 if not sharing else 1 if packed else 12)
        loss, out = trainer.compute_loss(model, batch, return_outputs=True)
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        results.append((loss, out.rewards, grads))
    (loss_a, rewards_a, grads_a), (loss_b, rewards_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rewards_a, rewards_b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_prefix_sharing_needs_our_reward_head(lm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(lm_dir, num_labels=1)
    with pytest.raises(ValueError, match="prefix_sharing needs rlhf_ext's RewardModel"):
        RewardTrainer(model, train_dataset=preference_pairs(4),
                      processing_class=AutoTokenizer.from_pretrained(lm_dir),
                      args=RewardConfig(output_dir=str(tmp_path), prefix_sharing=True, **COMMON))


def test_prefix_sharing_is_on_by_default_for_our_reward_model_only(lm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    tok, data = AutoTokenizer.from_pretrained(lm_dir), preference_pairs(4)
    classifier = AutoModelForSequenceClassification.from_pretrained(lm_dir, num_labels=1)
    for model, expected in ((str(lm_dir), True), (classifier, False)):
        trainer = RewardTrainer(model, train_dataset=data, processing_class=tok,
                                args=RewardConfig(output_dir=str(tmp_path), **COMMON))
        assert trainer.args.prefix_sharing is expected
        assert trainer.args.padding_free is expected  # packed too: the backbone is sdpa
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        assert ("segment_ids" in batch) is expected
        assert batch["input_ids"].shape[0] == (1 if expected else 8)
    with pytest.raises(ValueError, match="needs prefix_sharing and an sdpa.*padding_free=Fa"):
        RewardTrainer(str(lm_dir), train_dataset=data, processing_class=tok,
                      args=RewardConfig(output_dir=str(tmp_path), **COMMON,
                                        prefix_sharing=False, padding_free=True))


def test_an_eval_dict_is_evaluated_set_by_set(lm_dir, tmp_path):
    """TRL's eval_dataset={"a": ..., "b": ...}: each set tokenized, evaluated and logged
    under its name, its accuracy computed on its own pairs."""
    tok = AutoTokenizer.from_pretrained(lm_dir)
    sets = {"a": preference_pairs(4, seed=8), "b": preference_pairs(6, seed=9)}
    trainer = RewardTrainer(str(lm_dir), train_dataset=preference_pairs(8), eval_dataset=sets,
                            processing_class=tok,
                            args=RewardConfig(output_dir=str(tmp_path), **COMMON))
    metrics = trainer.evaluate()
    for name, data in sets.items():
        rewards = score(trainer.model, tok, list(data["prompt"]) * 2,
                        list(data["chosen"]) + list(data["rejected"]))
        n = len(data)
        wins = sum(c > r for c, r in zip(rewards[:n], rewards[n:])) / n
        assert metrics[f"eval_{name}_accuracy"] == pytest.approx(wins), name


def test_a_model_given_by_path_trains_in_float32(lm_dir, tmp_path):
    """A bfloat16 checkpoint given by path loads in float32, as TRL's trainers load it
    (transformers 5 alone keeps the checkpoint's dtype: AdamW in pure bf16, where small
    updates round away); model_init_kwargs' dtype still wins."""
    from rlhf_ext import DPOConfig, DPOTrainer

    path = tmp_path / "bf16"
    LlamaForSequenceClassification.from_pretrained(lm_dir, num_labels=1, dtype=torch.bfloat16
                                                   ).save_pretrained(path)
    AutoTokenizer.from_pretrained(lm_dir).save_pretrained(path)
    data = preference_pairs(4, seed=1)
    common = {k: v for k, v in COMMON.items() if k != "max_length"}
    for trainer_cls, config_cls in ((RewardTrainer, RewardConfig), (DPOTrainer, DPOConfig)):
        for init, dtype in ((None, torch.float32), ({"dtype": "bfloat16"}, torch.bfloat16)):
            trainer = trainer_cls(str(path), args=config_cls(
                output_dir=str(tmp_path / "out"), model_init_kwargs=init, **common),
                train_dataset=data)
            assert {p.dtype for p in trainer.model.parameters()} == {dtype}, trainer_cls
