"""Tokenizer and model factories: determinism, round trips, offline reloads."""

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ext.worlds.tiny import build_model, build_tokenizer
from rlhf_ext.worlds.tiny.task import ASPECTS, LEXICON


def test_offline_mode_is_on():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_tokenizer_deterministic_and_round_trip(world_dir):
    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    again = build_tokenizer(seed=0)
    text = "i saw the film with friends . the plot was very superb . five stars ."
    assert tok(text)["input_ids"] == again(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"]) == text
    odd = "Ünïcode & digits 123 stay intact"
    assert tok.decode(tok(odd)["input_ids"]) == odd
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|eos|>"
    assert tok.pad_token_id != tok.eos_token_id
    # every grammar word is one token after a space
    assert all(len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1
               for w in list(LEXICON) + list(ASPECTS))


def test_chat_template_assistant_mask(world_dir):
    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    messages = [{"role": "user", "content": "i saw the film ."},
                {"role": "assistant", "content": "the plot was good ."}]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assistant = [t for t, m in zip(ids, mask) if m]
    assert tok.decode(assistant) == " the plot was good .<|eos|>"
    assert tok.decode([t for t, m in zip(ids, mask) if not m]) == "<|user|>i saw the film .<|assistant|>"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>i saw the film .<|assistant|>"


def test_model_save_load_round_trip_offline(world_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    model = AutoModelForCausalLM.from_pretrained(world_dir / "base")
    again = build_model("small", tok, seed=0)
    ids = torch.tensor([tok("the plot was good .")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits, rtol=0, atol=0)
        model.save_pretrained(tmp_path / "m")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        torch.testing.assert_close(model(ids).logits, reloaded(ids).logits, rtol=0, atol=0)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    other = build_model("small", tok, seed=1)
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)
