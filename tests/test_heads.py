"""Reward and value heads: pooling, save/load, Auto classes, multi-objective, LoRA, 4-bit."""

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2Model,
    Qwen2Config,
    Qwen2Model,
)

import rlhf_ext  # noqa: F401  (registers the heads)
from rlhf_ext.heads import RewardModel, RewardModelConfig, ValueModel, last_token_index
from rlhf_ext.tiny import build_model


@pytest.fixture(scope="module")
def backbone_dir(world_dir, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    path = tmp_path_factory.mktemp("rm") / "lm"
    build_model("tiny", tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_last_token_index_by_hand():
    mask = torch.tensor([[1, 1, 1, 0, 0],    # right padding -> 2
                         [0, 0, 1, 1, 1],    # left padding -> 4
                         [1, 1, 1, 1, 1],    # full length -> 4
                         [1, 0, 0, 0, 0]])   # one token -> 0
    assert last_token_index(mask).tolist() == [2, 4, 4, 0]


def test_pooling_is_padding_invariant_and_reads_mask_not_ids(backbone_dir):
    model = RewardModel.from_backbone(str(backbone_dir)).eval()
    eos = model.config.eos_token_id
    seq = [5, 9, 17, 33, eos]
    with torch.no_grad():
        alone = model(torch.tensor([seq])).rewards
        # right padding, with pad == eos: the real eos must still be pooled
        right = model(torch.tensor([seq + [eos, eos]]),
                      attention_mask=torch.tensor([[1] * 5 + [0, 0]])).rewards
        # left padding (position ids matter for Llama: pass them as generation does)
        left = model(torch.tensor([[eos, eos] + seq]),
                     attention_mask=torch.tensor([[0, 0] + [1] * 5]),
                     position_ids=torch.tensor([[0, 0, 0, 1, 2, 3, 4]])).rewards
        # the hidden state pooled is the one at the real eos, not at a pad
        hidden = model.backbone(torch.tensor([seq])).last_hidden_state[0, -1]
    by_hand = hidden @ model.score.weight[0] + model.score.bias[0]
    torch.testing.assert_close(alone[0], by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=1e-4, atol=1e-4)


def test_head_init_scale_and_fresh_head(backbone_dir):
    model = RewardModel.from_backbone(str(backbone_dir), seed=3)
    hidden = model.config.hidden_size
    assert model.score.weight.std().item() == pytest.approx(1 / (hidden + 1) ** 0.5, rel=0.3)
    assert torch.count_nonzero(model.score.bias) == 0
    lm = AutoModelForSequenceClassification  # noqa: F841
    from transformers import AutoModelForCausalLM
    causal = AutoModelForCausalLM.from_pretrained(backbone_dir)
    torch.testing.assert_close(model.backbone.embed_tokens.weight, causal.model.embed_tokens.weight)


def test_save_load_and_auto_round_trip(backbone_dir, tmp_path):
    model = RewardModel.from_backbone(str(backbone_dir)).eval()
    ids = torch.tensor([[3, 8, 13, 21]])
    model.save_pretrained(tmp_path / "rm")
    assert (tmp_path / "rm" / "model.safetensors").exists()
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(again) is RewardModel
    with torch.no_grad():
        torch.testing.assert_close(model(ids).rewards, again(ids).rewards, rtol=0, atol=0)
    value = ValueModel.from_backbone(str(backbone_dir)).eval()
    value.save_pretrained(tmp_path / "vm")
    loaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "vm").eval()
    assert type(loaded) is ValueModel
    with torch.no_grad():
        out = loaded(ids).values
        assert out.shape == (1, 4)
        torch.testing.assert_close(out, value(ids).values, rtol=0, atol=0)


def test_multi_objective_fixed_and_learned(backbone_dir, tmp_path):
    names = ["sentiment", "fluency", "brevity"]
    fixed = RewardModel.from_backbone(str(backbone_dir), objective_names=names,
                                      combination_weights=[0.5, 0.3, 0.2]).eval()
    ids = torch.tensor([[3, 8, 13], [4, 9, 2]])
    with torch.no_grad():
        out = fixed(ids)
    assert out.logits.shape == (2, 3)
    torch.testing.assert_close(out.rewards, out.logits @ torch.tensor([0.5, 0.3, 0.2]))
    learned = RewardModel.from_backbone(str(backbone_dir), objective_names=names,
                                        combination="learned").eval()
    with torch.no_grad():
        out = learned(ids)
    torch.testing.assert_close(out.gate.sum(-1), torch.ones(2))
    torch.testing.assert_close(out.rewards, (out.gate * out.logits).sum(-1))
    learned.save_pretrained(tmp_path / "multi")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "multi").eval()
    assert again.config.objective_names == names and again.config.combination == "learned"
    with torch.no_grad():
        torch.testing.assert_close(again(ids).rewards, out.rewards, rtol=0, atol=0)
    with pytest.raises(ValueError, match="combination_weights has 2 values for 3 objectives"):
        RewardModelConfig(objective_names=names, combination_weights=[1.0, 0.0])


@pytest.mark.parametrize("config_cls, model_cls", [(GPT2Config, GPT2Model), (Qwen2Config, Qwen2Model)])
def test_other_backbones(tmp_path, config_cls, model_cls):
    small = dict(GPT2Config=dict(n_embd=32, n_layer=1, n_head=2, vocab_size=64),
                 Qwen2Config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, intermediate_size=64, vocab_size=64))
    model_cls(config_cls(**small[config_cls.__name__])).save_pretrained(tmp_path / "b")
    rm = RewardModel.from_backbone(str(tmp_path / "b")).eval()
    rm.save_pretrained(tmp_path / "rm")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(rm(ids).rewards, again(ids).rewards)


def test_lora_on_backbone_keeps_head_trainable(backbone_dir):
    from peft import LoraConfig, get_peft_model

    model = RewardModel.from_backbone(str(backbone_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                  modules_to_save=["score"]))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("score" in n for n in trainable)
    assert not any("embed_tokens" in n or "mlp" in n for n in trainable)


def test_4bit_backbone(backbone_dir):
    from bitsandbytes.nn import Linear4bit

    from rlhf_ext.models import quantization_config

    model = RewardModel.from_backbone(str(backbone_dir), quantization_config=quantization_config(
        load_in_4bit=True, compute_dtype=torch.float32))
    assert any(isinstance(m, Linear4bit) for m in model.backbone.modules())
    assert model.score.weight.dtype == torch.float32
    with torch.no_grad():
        out = model(torch.tensor([[3, 8, 13]])).rewards
    assert out.shape == (1,) and torch.isfinite(out).all()
