"""PreferenceTrainer behaviour: data errors, formats, reference modes, LoRA, 4-bit, cache,
resume, model card."""

import gc

import pytest
import torch
from conftest import MULTIPROCESS, StopAt
from datasets import Dataset
from transformers import AutoTokenizer, LlamaForCausalLM

from rlhf_ext.data import DataError
from rlhf_ext.logps import batch_logps
from rlhf_ext.preference import PreferenceConfig, PreferenceTrainer
from rlhf_ext.worlds.tiny import preference_pairs, to_conversational

BASE = dict(max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to="none",
            use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, max_length=64)


def config(tmp_path, **kw):
    return PreferenceConfig(output_dir=str(tmp_path / "out"), **{**BASE, **kw})


def make(policy_dir, tok, tmp_path, data, **kw):
    return PreferenceTrainer(str(policy_dir), args=config(tmp_path, **kw), train_dataset=data,
                             processing_class=tok)


PAIRS = preference_pairs(16, seed=1)


@pytest.mark.parametrize("rows, loss, message", [
    ({"prompt": ["a"], "chosen": [" b ."]}, "sigmoid",
     r"columns \['chosen', 'prompt'\] fit no preference format"),
    ({"prompt": ["a", "b"], "chosen": [" x .", "  "], "rejected": [" y .", " z ."]}, "sigmoid",
     r"row 1, column 'chosen': empty text"),
    ({"prompt": ["a"], "chosen": [" x ."], "rejected": [3]}, "sigmoid",
     r"row 0, column 'rejected': expected a string.*got int"),
    ({"prompt": ["a", "b"], "completion": [" x .", " y ."], "label": [1, 0]}, "kto",
     r"row 0, column 'label': expected True .*got 1"),
    ({"prompt": ["a"], "completion": [" x ."], "label": [True]}, "sigmoid",
     r"unpaired .* needs pairs: give prompt/chosen/rejected"),
    ({"prompt": [" the" * 70], "chosen": [" x ."], "rejected": [" y ."]}, "sigmoid",
     r"row 0, column 'prompt': 70 tokens.*max_length=64"),
])
def test_bad_data_fails_before_training(policy_dir, tok, tmp_path, rows, loss, message):
    with pytest.raises(DataError, match=message):
        make(policy_dir, tok, tmp_path, Dataset.from_dict(rows), loss_type=loss)
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_keep_end_keeps_rows_whose_prompt_is_longer_than_max_length(policy_dir, tok, tmp_path):
    """keep_end keeps a sequence's last max_length tokens, so a 70-token prompt under
    max_length 64 still has its completion (TRL keeps these rows); keep_start refuses it
    (above)."""
    rows = Dataset.from_dict({"prompt": [" the" * 70, " the film was"],
                              "chosen": [" warm and fun .", " good ."],
                              "rejected": [" dull .", " bad ."]})
    trainer = make(policy_dir, tok, tmp_path, rows, truncation_mode="keep_end",
                   padding_free=False, prefix_sharing=False, per_device_train_batch_size=2,
                   max_steps=1)
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([row])
    kept = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert kept == (row["prompt_ids"] + row["chosen_ids"])[-64:]
    trainer.train()
    assert 0 < trainer.state.log_history[0]["loss"] < 10


def test_unknown_loss_fails_at_config(tmp_path):
    with pytest.raises(ValueError, match="unknown loss_type 'simpoo'; valid names: .*simpo"):
        config(tmp_path, loss_type="simpoo")


def test_formats_tokenize_alike(policy_dir, tok, tmp_path):
    """Explicit prompt, implicit prompt (shared prefix) and conversational rows."""
    explicit = make(policy_dir, tok, tmp_path, PAIRS.select(range(4))).train_dataset
    implicit_rows = Dataset.from_dict({
        "chosen": [p + c for p, c in zip(PAIRS["prompt"][:4], PAIRS["chosen"][:4])],
        "rejected": [p + r for p, r in zip(PAIRS["prompt"][:4], PAIRS["rejected"][:4])]})
    implicit = make(policy_dir, tok, tmp_path, implicit_rows).train_dataset
    # the implicit prompt is the longest shared text prefix, which may run into the
    # completions' first common words; the full sequences are the same tokens
    for a, b in zip(explicit, implicit):
        assert a["prompt_ids"] + a["chosen_ids"] == b["prompt_ids"] + b["chosen_ids"]
    conv = make(policy_dir, tok, tmp_path, to_conversational(PAIRS.select(range(4)))).train_dataset
    row, src = conv[0], PAIRS[0]
    assert tok.decode(row["prompt_ids"]) == f"<|user|>{src['prompt']}<|assistant|>"
    assert tok.decode(row["chosen_ids"]) == src["chosen"] + "<|eos|>"
    assert tok.decode(explicit[0]["chosen_ids"]) == src["chosen"] + "<|eos|>"


def test_kto_unpairs_paired_data(policy_dir, tok, tmp_path):
    trainer = make(policy_dir, tok, tmp_path, PAIRS, loss_type="kto")
    data = trainer.train_dataset
    assert len(data) == 2 * len(PAIRS) and sum(data["label"]) == len(PAIRS)
    # the KL completions are the previous row's: mismatched pairs
    assert data["kl_completion_ids"][1] == data["completion_ids"][0]
    trainer.train()
    assert "kl" in trainer.state.log_history[0]


def count_forwards(model):
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("loss, forwards_per_step", [("orpo", 1), ("simpo", 1), ("sigmoid", 2)])
def test_reference_forward_only_when_needed(policy_dir, tok, tmp_path, loss, forwards_per_step):
    trainer = make(policy_dir, tok, tmp_path, PAIRS, loss_type=loss, max_steps=1)
    calls = count_forwards(trainer.model)
    ref_calls = count_forwards(trainer.ref_model) if trainer.ref_model is not None else []
    trainer.train()
    assert len(calls) + len(ref_calls) == forwards_per_step
    assert (trainer.reference.mode == "none") == (forwards_per_step == 1)


def test_lora_changes_only_adapters_and_builds_no_second_model(policy_dir, tok, tmp_path):
    from peft import LoraConfig

    gc.collect()
    before = sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects())
    trainer = PreferenceTrainer(
        str(policy_dir), args=config(tmp_path, learning_rate=1e-2, max_steps=3),
        train_dataset=PAIRS, processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gc.collect()
    assert sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects()) == before + 1
    assert trainer.ref_model is None and trainer.reference.mode == "adapters_off"
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, p in trainer.model.named_parameters():
        changed = not torch.equal(start[name], p.detach())
        assert changed == ("lora_B" in name or "lora_A" in name), name
    # the reference is exactly the base model (adapters off)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    base = LlamaForCausalLM.from_pretrained(policy_dir)
    with torch.no_grad():
        expected, _ = batch_logps(base, batch)
    got, _ = trainer.reference.logps(trainer.model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_4bit_lora_trains(policy_dir, tok, tmp_path):
    from bitsandbytes.nn import Linear4bit
    from peft import LoraConfig

    from rlhf_ext.models import load_causal_lm, quantization_config

    model = load_causal_lm(str(policy_dir), quantization_config=quantization_config(
        load_in_4bit=True, compute_dtype=torch.float32),
        device_map="cpu")  # where the run is (use_cpu), not bitsandbytes' GPU
    trainer = PreferenceTrainer(  # one fixed batch of 8, so the loss must fall
        model, args=config(tmp_path, learning_rate=2e-2, max_steps=8,
                           per_device_train_batch_size=8),
        train_dataset=PAIRS.select(range(8)), processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    assert any(isinstance(m, Linear4bit) for m in trainer.model.modules())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] - 0.05, losses
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "loss" in h]
    assert margins[-1] > 0


def test_precomputed_reference_matches_and_is_cached(policy_dir, tok, tmp_path):
    data = PAIRS.select(range(8))
    live = make(policy_dir, tok, tmp_path, data, max_steps=1, learning_rate=0.0)
    batch = live.data_collator([live.train_dataset[i] for i in range(8)])
    ref, _ = live.reference.logps(live.model, batch)
    cache = tmp_path / "cache"
    first = make(policy_dir, tok, tmp_path, data, precompute_ref_log_probs=True,
                 ref_logps_cache_dir=str(cache))
    assert first.reference.cache_hit is False and first.reference.cache_path.exists()
    got = torch.tensor(list(first.train_dataset["ref_chosen_logps"])
                       + list(first.train_dataset["ref_rejected_logps"]))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    second = make(policy_dir, tok, tmp_path, data, precompute_ref_log_probs=True,
                  ref_logps_cache_dir=str(cache))
    assert second.reference.cache_hit is True
    assert list(second.train_dataset["ref_chosen_logps"]) == list(
        first.train_dataset["ref_chosen_logps"])
    # other data -> another key
    third = make(policy_dir, tok, tmp_path, PAIRS.select(range(8, 16)),
                 precompute_ref_log_probs=True, ref_logps_cache_dir=str(cache))
    assert third.reference.cache_hit is False
    # training reads the columns: no reference forward at all
    calls = count_forwards(second.model)
    second.train()
    assert len(calls) == BASE["max_steps"]


def test_evaluate_after_training_keeps_the_initial_reference(policy_dir, tok, tmp_path):
    """precompute_ref_log_probs without a ref_model: the reference is the policy before
    training. evaluate(eval_dataset=...) after training must not score the trained policy
    against itself (margins 0, loss exactly log 2): the set given at construction reads the
    initial policy's cached values, and a set never seen is refused with the way out."""
    train, held_out = PAIRS.select(range(8)), PAIRS.select(range(8, 12))
    args = config(tmp_path, precompute_ref_log_probs=True, learning_rate=5e-3, max_steps=3,
                  ref_logps_cache_dir=str(tmp_path / "cache"))
    trainer = PreferenceTrainer(str(policy_dir), args=args, train_dataset=train,
                                eval_dataset=held_out, processing_class=tok)
    trainer.train()
    own = trainer.evaluate()
    again = trainer.evaluate(eval_dataset=held_out)
    assert abs(own["eval_rewards/margins"]) > 1e-3  # the policy moved away from its reference
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/chosen"):
        assert again[key] == pytest.approx(own[key], rel=1e-5, abs=1e-7), key
    with pytest.raises(ValueError, match=r"the policy has trained since \(step 3\).*ref_model="):
        trainer.evaluate(eval_dataset=PAIRS.select(range(12, 16)))


@pytest.mark.parametrize("extra", [{}, dict(sync_ref_model=True, ref_model_sync_steps=2,
                                           ref_model_mixup_alpha=0.5)], ids=["dpo", "tr-dpo"])
def test_resume_matches_uninterrupted(policy_dir, tok, tmp_path, extra):
    """TR-DPO's reference moves at steps 2, 4 and 6: resumed at 3, it must start from the
    reference saved with the checkpoint, not from the initial one."""
    kw = dict(max_steps=6, learning_rate=5e-3, save_strategy="steps", save_steps=3, **extra)
    full = make(policy_dir, tok, tmp_path / "a", PAIRS, **kw)
    full.train()
    part = make(policy_dir, tok, tmp_path / "b", PAIRS, **kw)
    part.add_callback(StopAt(3))  # interrupted right after the checkpoint at step 3
    part.train()
    assert part.state.global_step == 3
    resumed = make(policy_dir, tok, tmp_path / "b", PAIRS, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    for (name, a), (_, b) in zip(full.ref_model.named_parameters(),
                                 resumed.ref_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    initial = make(policy_dir, tok, tmp_path / "c", PAIRS, **kw).ref_model
    moved = any(not torch.equal(a, b) for a, b in zip(initial.parameters(),
                                                       resumed.ref_model.parameters()))
    assert moved == bool(extra)


def test_model_card(policy_dir, tok, tmp_path):
    trainer = make(policy_dir, tok, tmp_path, PAIRS, loss_type=["sigmoid", "sft"],
                   loss_weights=[1.0, 0.2])
    trainer.train()
    metrics = trainer.evaluate(PAIRS.select(range(8)))
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies",
                "eval_logps/chosen", "eval_nll_loss"):
        assert key in metrics, key
    trainer.save_model()
    trainer.create_model_card(dataset_name="tiny/pairs")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "rlhf-ext" in card and "sigmoid+sft" in card and str(policy_dir) in card
    assert '"loss_weights": [\n    1.0,\n    0.2\n  ]' in card
    assert '"train_loss"' in card


def test_padding_free_collator_packs_one_row(tok):
    from rlhf_ext.data import PreferenceCollator

    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
            {"prompt_ids": [6], "chosen_ids": [7, 8], "rejected_ids": [9]}]
    out = PreferenceCollator(0, padding_free=True)(rows)
    assert out["input_ids"].tolist() == [[1, 2, 3, 6, 7, 8, 1, 2, 4, 5, 6, 9]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1]]
    assert out["sequence_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3]]
    assert out["completion_mask"].tolist() == [[0, 0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1]]
    assert "attention_mask" not in out


PADDED = {"padding_free": False, "prefix_sharing": False}
PACKED = {"padding_free": True, "prefix_sharing": False}
SHARED = {"padding_free": False, "prefix_sharing": True}
SHARED_PACKED = {"padding_free": True, "prefix_sharing": True}  # the sdpa default (pairs)


@pytest.mark.parametrize("loss, layout", [("sigmoid", PACKED), ("kto", PACKED),
                                          ("simpo", PACKED), ("sigmoid", SHARED),
                                          ("simpo", SHARED), ("sigmoid", SHARED_PACKED),
                                          ("simpo", SHARED_PACKED)])
def test_packed_layouts_match_padded(policy_dir, tok, tmp_path, loss, layout):
    kw = dict(loss_type=loss, max_steps=1, learning_rate=0.0, per_device_train_batch_size=8)
    padded = make(policy_dir, tok, tmp_path / "a", PAIRS, **PADDED, **kw)
    padded.train()
    packed = make(policy_dir, tok, tmp_path / "b", PAIRS, **layout, **kw)
    rows = packed.data_collator([packed.train_dataset[i] for i in range(8)])["input_ids"]
    assert rows.shape[0] == (1 if layout["padding_free"] else 8 if layout["prefix_sharing"]
                             else 16)
    packed.train()
    a, b = padded.state.log_history[0], packed.state.log_history[0]
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


@MULTIPROCESS
def test_precompute_under_deepspeed_zero3_matches(sft_run, world_dir, tmp_path):
    """ZeRO-3 partitions the weights at load; the precompute pass gathers them, so the
    cache key and the values equal a plain run's (same file name, values to 1e-5)."""
    from conftest import run_recipe
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    sft_dir, _ = sft_run
    # 256 of the 2000 pairs: the two passes over all of them took most of the test's 68 s
    pairs = load_from_disk(str(world_dir / "data" / "pairs")).select(range(256))
    pairs.save_to_disk(str(tmp_path / "pairs"))
    plain = PreferenceTrainer(
        AutoModelForCausalLM.from_pretrained(sft_dir), processing_class=tok_of(sft_dir),
        train_dataset=pairs, args=PreferenceConfig(
            output_dir=str(tmp_path / "plain"), precompute_ref_log_probs=True, max_length=128,
            ref_logps_cache_dir=str(tmp_path / "c1"), report_to="none", use_cpu=True,
            per_device_train_batch_size=32))
    run_recipe(["--config_file", "accelerate_configs/zero3.yaml", "recipes/preference.py",
                "--config", "recipes/tiny/dpo.yaml", "--precompute_ref_log_probs", "true",
                "--max_steps", "1", "--tiny_eval_prompts", "0", "--ddp_backend", "gloo",
                "--output_dir", str(tmp_path / "ds"), "--model_name_or_path", str(sft_dir),
                "--dataset_name", str(tmp_path / "pairs"),
                "--ref_logps_cache_dir", str(tmp_path / "c2")], launcher="accelerate_config")
    (ds_file,) = (tmp_path / "c2").glob("*.pt")
    assert ds_file.name == plain.reference.cache_path.name
    ds, ref = (torch.load(f, weights_only=True)["columns"]
               for f in (ds_file, plain.reference.cache_path))
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(ds[key], ref[key], rtol=1e-5, atol=1e-4)
    assert (tmp_path / "ds" / "model.safetensors").exists()  # ZeRO-3 saved a loadable model
    AutoModelForCausalLM.from_pretrained(tmp_path / "ds")


def tok_of(path):
    return AutoTokenizer.from_pretrained(path)


def test_the_lm_head_runs_in_the_runs_mixed_precision(policy_dir, tok, tmp_path):
    """bf16: the LM head, applied after the forward in blocks, runs under the run's
    autocast like the forward (a bf16 matmul on a GPU, not a float32 one), in training and
    when the reference log-probs are precomputed; the first loss is still log 2."""
    seen = []
    model = LlamaForCausalLM.from_pretrained(policy_dir)
    model.lm_head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    trainer = PreferenceTrainer(model, args=config(
        tmp_path, bf16=True, max_steps=1, learning_rate=0.0, precompute_ref_log_probs=True,
        per_device_train_batch_size=4), train_dataset=PAIRS.select(range(4)),
        processing_class=tok)
    trainer.train()
    assert len(seen) > 2 and set(seen) == {torch.bfloat16}, seen  # precompute and step 1
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
