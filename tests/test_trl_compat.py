"""A TRL user's configs work with the import changed: every field of TRL 1.16's DPO, KTO,
CPO, ORPO and Reward configs exists here with TRL's default (the documented exceptions
aside), the data fields do what TRL's do, and what we do not implement is refused at
config time with the reason. (Loss parity by these names: test_preference_parity.py.)"""

import dataclasses
import warnings

import pytest

import rlhf_ext
from rlhf_ext.config_fields import apply_tokenizer_fields
from rlhf_ext.data import PreferenceCollator, prepare_preference_dataset, tokenize_preference_row
from rlhf_ext.losses import params_for
from rlhf_ext.worlds.tiny import preference_pairs

# Defaults that differ from TRL's on purpose (docs/trl.md, "What differs from TRL")
OUR_DEFAULTS = {"activation_checkpointing", "bf16",
                "train_sampling_strategy", "beta", "loss_type",
                "padding_free"}  # None: on where prefix sharing is, under sdpa


def trl_configs():
    import trl
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    return [(trl.DPOConfig, rlhf_ext.DPOConfig), (trl.KTOConfig, rlhf_ext.KTOConfig),
            (CPOConfig, rlhf_ext.CPOConfig), (ORPOConfig, rlhf_ext.ORPOConfig),
            (trl.RewardConfig, rlhf_ext.RewardConfig)]


@pytest.mark.parametrize("index", range(5), ids=["dpo", "kto", "cpo", "orpo", "reward"])
def test_every_trl_field_exists_with_trls_default(index):
    theirs_cls, ours_cls = trl_configs()[index]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, ours = theirs_cls(output_dir="x", use_cpu=True), ours_cls(output_dir="x",
                                                                          use_cpu=True)
    names = {f.name for f in dataclasses.fields(theirs_cls)} - {"output_dir", "logging_dir"}
    missing = sorted(n for n in names if not hasattr(ours, n))
    assert not missing, f"{ours_cls.__name__} lacks TRL's {missing}"
    differ = sorted(n for n in names - OUR_DEFAULTS if getattr(ours, n) != getattr(theirs, n))
    assert not differ, [(n, getattr(ours, n), getattr(theirs, n)) for n in differ]
    assert ours.learning_rate == theirs.learning_rate and ours.logging_steps == 10
    if hasattr(ours, "loss_specs"):  # beta None = the loss's own default, TRL's 0.1 here
        assert params_for(ours.loss_specs[0], ours.loss_params()).beta == theirs.beta
        trl_loss = getattr(theirs, "loss_type", "orpo")  # TRL's ORPO has no loss_type
        assert ours.loss_type == (trl_loss if isinstance(trl_loss, list) else [trl_loss])
    assert ours.gradient_checkpointing and theirs.gradient_checkpointing  # both recompute
    assert not ours.bf16  # ours: docs/trl.md says why


def test_truncation_lengths_keep_the_prompts_end_and_the_completions_start(tok):
    row = {"prompt": "the film was", "chosen": " great fun and warm", "rejected": " dull"}
    full = tokenize_preference_row(row, tok, ("chosen", "rejected"))
    cut = tokenize_preference_row(row, tok, ("chosen", "rejected"), max_prompt_length=2,
                                  max_completion_length=3)
    assert len(full["prompt_ids"]) > 2 and len(full["chosen_ids"]) > 3
    assert cut["prompt_ids"] == full["prompt_ids"][-2:]
    assert cut["chosen_ids"] == full["chosen_ids"][:3]
    assert cut["rejected_ids"] == full["rejected_ids"][:3]


def test_dataset_num_proc_tokenizes_the_same(tok):
    data = preference_pairs(16, seed=1)
    one = prepare_preference_dataset(data, tok, kind="paired", unpair=False, max_length=64)
    two = prepare_preference_dataset(data, tok, kind="paired", unpair=False, max_length=64,
                                     num_proc=2)
    assert one.to_dict() == two.to_dict()


@pytest.mark.parametrize("given, expected", [("auto", None), ("8", 8), (8, 8), ("none", None)])
def test_pad_to_multiple_of_as_trl_reads_it(given, expected):
    assert rlhf_ext.DPOConfig(output_dir="x", pad_to_multiple_of=given).pad_to_multiple_of \
        == expected
    assert rlhf_ext.RewardConfig(output_dir="x", pad_to_multiple_of=given).pad_to_multiple_of \
        == expected


def test_pad_fields_set_the_padding(tok, tmp_path):
    import copy

    tok = copy.deepcopy(tok)
    args = rlhf_ext.DPOConfig(output_dir="x", pad_token=tok.eos_token, padding_value=7)
    assert apply_tokenizer_fields(tok, args) == 7 and tok.pad_token == tok.eos_token
    batch = PreferenceCollator(7, pad_to_multiple_of=8)(
        [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 7, 7, 7, 7], [1, 2, 4, 5, 6, 7, 7, 7]]
    with pytest.raises(ValueError, match="pad_token 'no-such-token' is not in the tokenizer"):
        apply_tokenizer_fields(tok, rlhf_ext.DPOConfig(output_dir="x", pad_token="no-such-token"))
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    apply_tokenizer_fields(tok, rlhf_ext.RewardConfig(output_dir="x",
                                                      chat_template_path=str(template)))
    assert tok.chat_template == template.read_text()


@pytest.mark.parametrize("make, message", [
    (lambda: rlhf_ext.DPOConfig(output_dir="x", router_aux_loss_coef=0.01),
     "mixture-of-experts router loss"),
    (lambda: rlhf_ext.ORPOConfig(output_dir="x", is_encoder_decoder=True), "decoder-only"),
    (lambda: rlhf_ext.KTOConfig(output_dir="x", loss_type="sigmoid"),
     "KTOConfig.loss_type is kto or apo_zero_unpaired"),
    (lambda: rlhf_ext.CPOConfig(output_dir="x", loss_type="hinge"), "hinge and ipo"),
    (lambda: rlhf_ext.CPOConfig(output_dir="x", alpha=0.2), "AlphaPO"),
    (lambda: rlhf_ext.ORPOConfig(output_dir="x", loss_type="simpo"), "ORPOConfig trains ORPO"),
    (lambda: rlhf_ext.KTOConfig(output_dir="x", ld_alpha=0.5), "ld_alpha compares"),
    (lambda: rlhf_ext.DPOConfig(output_dir="x", ld_alpha=1.5), r"ld_alpha must be in \[0, 1\]"),
    (lambda: rlhf_ext.DPOConfig(output_dir="x", loss_type="aot", use_weighting=True),
     "couple the examples"),
    (lambda: rlhf_ext.DPOConfig(output_dir="x", loss_type="nca_pair",
                                f_divergence_type="forward_kl"), "Use reverse_kl with them"),
    (lambda: rlhf_ext.DPOConfig(output_dir="x", f_divergence_type="hellinger"),
     "unknown f_divergence_type"),
    (lambda: rlhf_ext.DPOConfig(output_dir="x", sync_ref_model=True,
                                precompute_ref_log_probs=True), "cannot be precomputed"),
    (lambda: rlhf_ext.CPOConfig(output_dir="x", sync_ref_model=True), "uses none"),
    (lambda: rlhf_ext.DPOConfig(output_dir="x", rpo_alpha=0.5, loss_type=["sigmoid", "sft"]),
     "already has sft"),
    (lambda: rlhf_ext.DPOConfig(output_dir="x", max_prompt_length=0), "positive integer"),
    (lambda: rlhf_ext.DPOConfig(output_dir="x", pad_to_multiple_of="eight"),
     "pad_to_multiple_of must be an integer"),
])
def test_what_is_not_implemented_is_refused_at_config_time(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_sync_ref_model_with_lora_is_refused(policy_dir, tok):
    from peft import LoraConfig

    args = rlhf_ext.DPOConfig(output_dir="x", sync_ref_model=True, use_cpu=True,
                              report_to="none")
    with pytest.raises(ValueError, match="with LoRA the reference is the base model"):
        rlhf_ext.DPOTrainer(str(policy_dir), args=args, train_dataset=preference_pairs(4),
                            processing_class=tok,
                            peft_config=LoraConfig(r=4, target_modules="all-linear"))


def test_a_trl_dpo_script_with_an_eval_dict_tensorboard_and_completions(policy_dir, tok,
                                                                        tmp_path):
    """TRL-style: DPOConfig/DPOTrainer, eval_dataset as a dict, report_to tensorboard,
    generate_during_eval. Each eval set gets its metrics; the scalars (TRL's names) and a
    completions table (policy and reference columns) reach TensorBoard and completions.md."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = rlhf_ext.DPOConfig(
        output_dir=str(tmp_path), report_to="tensorboard", max_steps=2, logging_steps=1,
        per_device_train_batch_size=4, per_device_eval_batch_size=3, eval_strategy="steps",
        eval_steps=2, generate_during_eval=True, max_completion_length=6, use_cpu=True,
        save_strategy="no", disable_tqdm=True)
    trainer = rlhf_ext.DPOTrainer(str(policy_dir), args=args, processing_class=tok,
                                  train_dataset=preference_pairs(8),
                                  eval_dataset={"a": preference_pairs(4, seed=2),
                                                "b": preference_pairs(4, seed=3)})
    trainer.train()
    logged = {k for log in trainer.state.log_history for k in log}
    assert {"eval_a_loss", "eval_b_loss", "eval_a_rewards/margins", "eval_b_entropy"} <= logged
    table = (tmp_path / "completions.md").read_text()
    assert "| prompt | policy | reference |" in table
    assert table.count("\n| ") == 2 * 4  # two evaluations (a and b), header + 3 rows each
    events = EventAccumulator(str(next(tmp_path.glob("runs/*"))),
                              size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/entropy", "train/mean_token_accuracy", "eval/a_loss"} <= scalars
    assert "completions/text_summary" in events.Tags()["tensors"]


# ---------------------------------------------------------------------------------------
# data as TRL users bring it
# ---------------------------------------------------------------------------------------

DATA_ARGS = dict(learning_rate=0.0, max_steps=1, per_device_train_batch_size=8,
                 per_device_eval_batch_size=8, logging_steps=1, report_to="none", use_cpu=True,
                 save_strategy="no", disable_tqdm=True, max_length=64, beta=0.3)


def first_loss(policy_dir, tok, data, tmp_path, **kw):
    trainer = rlhf_ext.DPOTrainer(str(policy_dir), processing_class=tok, train_dataset=data,
                                  args=rlhf_ext.DPOConfig(output_dir=str(tmp_path),
                                                          **{**DATA_ARGS, **kw}))
    trainer.train()
    return trainer.state.log_history[0]["loss"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "kto"])
def test_pre_tokenized_and_streamed_data_train_as_text_does(policy_dir, tok, tmp_path,
                                                            loss_type):
    """One batch of all 8 pairs at lr 0: the same loss from text, from token ids
    (prompt_ids/chosen_ids/rejected_ids, unpaired for KTO) and, for DPO, from an
    IterableDataset (tokenized as it is read)."""
    text = preference_pairs(8, seed=4)
    ids = text.map(tokenize_preference_row, remove_columns=text.column_names,
                   fn_kwargs={"tokenizer": tok, "completions": ("chosen", "rejected")})
    want = first_loss(policy_dir, tok, text, tmp_path / "text", loss_type=loss_type)
    assert first_loss(policy_dir, tok, ids, tmp_path / "ids", loss_type=loss_type) == \
        pytest.approx(want, abs=1e-6)
    if loss_type == "sigmoid":
        stream = first_loss(policy_dir, tok, text.to_iterable_dataset(), tmp_path / "stream")
        assert stream == pytest.approx(want, abs=1e-6)


def test_bad_data_as_trl_users_bring_it_is_named(policy_dir, tok, tmp_path):
    from datasets import Dataset, DatasetDict

    from rlhf_ext.data import DataError

    pairs = preference_pairs(4)
    args = rlhf_ext.DPOConfig(output_dir=str(tmp_path), **DATA_ARGS)
    with pytest.raises(DataError, match=r"is a DatasetDict with splits \['train', 'test'\]; "
                                        r"pass one split, e.g. dataset\['train'\]"):
        rlhf_ext.DPOTrainer(str(policy_dir), args=args, processing_class=tok,
                            train_dataset=DatasetDict({"train": pairs, "test": pairs}))
    bad = Dataset.from_dict({"prompt_ids": [[1, 2], [3]], "chosen_ids": [[4], [5, -1]],
                             "rejected_ids": [[6], [7]]})
    with pytest.raises(DataError, match=r"row 1, column 'chosen_ids': expected a list of token"):
        rlhf_ext.DPOTrainer(str(policy_dir), args=args, processing_class=tok, train_dataset=bad)
    kto = rlhf_ext.KTOConfig(output_dir=str(tmp_path), **DATA_ARGS)
    with pytest.raises(DataError, match="IterableDataset, and KTO pairs each completion"):
        rlhf_ext.KTOTrainer(str(policy_dir), args=kto, processing_class=tok,
                            train_dataset=pairs.to_iterable_dataset())


def test_compute_metrics_gets_the_implicit_rewards(policy_dir, tok, tmp_path):
    """compute_metrics, accepted as in TRL, is called with predictions (r_chosen, r_rejected)
    and labels 0: its accuracy equals the trainer's own rewards/accuracies."""
    def chosen_wins(prediction):
        return {"chosen_wins": float((prediction.predictions.argmax(-1)
                                      == prediction.label_ids).mean())}

    data = preference_pairs(8, seed=5)
    trainer = rlhf_ext.DPOTrainer(str(policy_dir), processing_class=tok, train_dataset=data,
                                  eval_dataset=preference_pairs(8, seed=6),
                                  compute_metrics=chosen_wins,
                                  args=rlhf_ext.DPOConfig(output_dir=str(tmp_path),
                                                          **{**DATA_ARGS, "learning_rate": 1e-2}))
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_chosen_wins"] == pytest.approx(metrics["eval_rewards/accuracies"])
    assert 0 < metrics["eval_chosen_wins"]


# ---------------------------------------------------------------------------------------
# model cards: a title, a usage snippet that runs, versions, the method's papers
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dpo", "dpo-lora", "reward", "reward-lora",
                                  "reward-classifier"])
def test_model_card_says_how_to_use_the_model_and_the_snippet_runs(policy_dir, tok, tmp_path,
                                                                   kind, capsys):
    import re
    from importlib.metadata import version

    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "my-model"
    common = dict(output_dir=str(out), max_steps=1, per_device_train_batch_size=4,
                  report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                  max_length=64)
    data = preference_pairs(4)
    if kind.startswith("dpo"):
        peft = LoraConfig(r=4, target_modules="all-linear") if kind == "dpo-lora" else None
        trainer = rlhf_ext.DPOTrainer(str(policy_dir), processing_class=tok, train_dataset=data,
                                      args=rlhf_ext.DPOConfig(ld_alpha=0.5, **common),
                                      peft_config=peft)
    else:
        model = str(policy_dir) if kind != "reward-classifier" else \
            AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
        peft = LoraConfig(r=4, target_modules="all-linear") if kind == "reward-lora" else None
        trainer = rlhf_ext.RewardTrainer(model, processing_class=tok, train_dataset=data,
                                         args=rlhf_ext.RewardConfig(**common), peft_config=peft)
    trainer.train()
    trainer.save_model(str(out))
    trainer.create_model_card()
    card = (out / "README.md").read_text()
    assert card.split("---\n", 2)[2].lstrip().startswith("# my-model\n")  # not the path
    assert f"- transformers: {version('transformers')}" in card
    paper = "2305.18290" if kind.startswith("dpo") else "2203.02155"
    assert f"huggingface.co/papers/{paper}" in card and f"arXiv:{paper}" in card
    if kind.startswith("dpo"):
        assert "arXiv:2409.06411" in card  # LD-DPO, from ld_alpha
    # every scalar reward model loads with plain transformers (and peft for an adapter)
    assert "needs rlhf_ext" not in card
    if kind.startswith("reward"):
        loader = "AutoPeftModel" if kind == "reward-lora" else "AutoModel"
        assert f"{loader}ForSequenceClassification.from_pretrained" in card
    snippet = re.search(r"## Use it\n\n```python\n(.*?)```", card, re.S).group(1)
    capsys.readouterr()
    exec(compile(snippet, "card", "exec"), {})  # loads from out, runs the model, prints
    assert capsys.readouterr().out.strip()


def test_compute_metrics_gets_kto_rewards_and_labels(policy_dir, tok, tmp_path):
    """Unpaired (KTO): each example's implicit reward and its label (1 desirable), so the
    mean reward gap computed there equals the trainer's rewards/margins (one eval batch)."""
    import numpy as np

    from rlhf_ext.worlds.tiny import unpaired_dataset

    def gap(prediction):
        rewards, labels = prediction.predictions, prediction.label_ids
        return {"gap": float(np.mean(rewards[labels == 1]) - np.mean(rewards[labels == 0]))}

    trainer = rlhf_ext.KTOTrainer(str(policy_dir), processing_class=tok,
                                  train_dataset=unpaired_dataset(8, seed=1),
                                  eval_dataset=unpaired_dataset(8, seed=2), compute_metrics=gap,
                                  args=rlhf_ext.KTOConfig(output_dir=str(tmp_path), **{
                                      **DATA_ARGS, "learning_rate": 1e-2}))
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_gap"] == pytest.approx(metrics["eval_rewards/margins"], rel=1e-4)
    assert metrics["eval_gap"] != 0


def test_ppo_samples_reach_weights_and_biases_as_a_table(policy_dir, tok, tmp_path,
                                                         monkeypatch):
    """report_to="wandb" (offline: W&B writes the run to disk): each sampling epoch's
    table is logged as a W&B Table whose rows are samples.md's, chat prompts with their
    newlines included."""
    import json

    from transformers import AutoModelForCausalLM

    from rlhf_ext.worlds.tiny import oracle_score, prompt_dataset

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    prompts = prompt_dataset(8, seed=5).map(lambda r: {"prompt": "a review.\n" + r["prompt"]})
    args = rlhf_ext.PPOConfig(output_dir=str(tmp_path / "ppo"), rollout_batch_size=4,
                              per_device_train_batch_size=4, response_length=6,
                              num_train_epochs=2, num_sample_generations=2, report_to="wandb",
                              use_cpu=True, save_strategy="no", disable_tqdm=True,
                              advantage_estimator="rloo", num_generations=2)
    trainer = rlhf_ext.PPOTrainer(AutoModelForCausalLM.from_pretrained(policy_dir), args, tok,
                                  prompts, reward=lambda p, c: [oracle_score(x) for x in c])
    trainer.train()
    import wandb

    wandb.finish()
    tables = sorted(tmp_path.glob("wandb/offline-run-*/files/media/table/samples_*.table.json"))
    markdown = (tmp_path / "ppo" / "samples.md").read_text()
    assert len(tables) == markdown.count("### step") == 2
    for path in tables:
        table = json.loads(path.read_text())
        assert table["columns"] == ["prompt", "completion", "score"]
        assert len(table["data"]) == 4
        for prompt, completion, score in table["data"]:
            assert "\n" not in prompt and f"| {prompt} | {completion} |" in markdown
            assert -1.0 <= float(score) <= 1.0
