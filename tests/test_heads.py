"""Reward and value heads: pooling, save/load, Auto classes, multi-objective, LoRA, 4-bit."""

import os

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
from rlhf_ext.heads import (
    RewardModel,
    RewardModelConfig,
    ValueModel,
    last_token_index,
    pooled_index,
    scalar_rewards,
)
from rlhf_ext.worlds.tiny import build_model


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


def test_pooled_index_by_hand():
    ids = torch.tensor([[5, 6, 2, 0, 0],     # pad 0: right padding -> 2
                        [5, 6, 2, 2, 2],     # pad == eos == 2: the last word -> 1
                        [2, 2, 5, 6, 2]])    # left padding with pad == eos -> 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    assert pooled_index(ids[:1], mask[:1], 0).tolist() == [2]
    assert pooled_index(ids[1:], mask[1:], 2).tolist() == [1, 3]
    assert pooled_index(ids[1:], mask[1:], None).tolist() == [2, 4]  # no pad: the mask


def test_pooling_is_transformers_classifier_pooling(backbone_dir):
    """Padding-invariant, and the token transformers' sequence classifier reads (the last
    non-pad one), with the tiny world's own pad and with pad == eos (SmolLM2's case, where
    a final eos is skipped): the same rewards as LlamaForSequenceClassification with the
    same weights, for left and right padding."""
    from transformers import LlamaForSequenceClassification

    model = RewardModel.from_backbone(str(backbone_dir)).eval()
    assert model.score.bias is None
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    assert pad != eos
    native = LlamaForSequenceClassification.from_pretrained(backbone_dir, num_labels=1).eval()
    native.score.weight.data.copy_(model.score.weight)
    seq = [5, 9, 17, 33, eos]
    for pad_id in (pad, eos):
        model.config.pad_token_id = native.config.pad_token_id = pad_id
        right = (torch.tensor([seq + [pad_id] * 2]), torch.tensor([[1] * 5 + [0, 0]]), None)
        left = (torch.tensor([[pad_id] * 2 + seq]), torch.tensor([[0, 0] + [1] * 5]),
                torch.tensor([[0, 0, 0, 1, 2, 3, 4]]))  # position ids as generation gives
        with torch.no_grad():
            alone = model(torch.tensor([seq])).rewards
            hidden = model.model(torch.tensor([seq])).last_hidden_state[0]
            for ids, mask, positions in (right, left):
                ours = model(ids, attention_mask=mask, position_ids=positions).rewards
                theirs = native(ids, attention_mask=mask, position_ids=positions).logits[:, 0]
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(ours, alone, rtol=1e-4, atol=1e-4)
        pooled = hidden[-1] if pad_id == pad else hidden[-2]  # pad == eos: the word before
        torch.testing.assert_close(alone[0], pooled @ model.score.weight[0], rtol=1e-5,
                                   atol=1e-5)


def test_head_init_scale_and_fresh_head(backbone_dir):
    model = RewardModel.from_backbone(str(backbone_dir), seed=3)
    hidden = model.config.hidden_size
    assert model.score.weight.std().item() == pytest.approx(1 / (hidden + 1) ** 0.5, rel=0.3)
    assert model.score.bias is None  # as transformers' classifier; a pairwise loss never moves one
    value = ValueModel.from_backbone(str(backbone_dir))
    assert torch.count_nonzero(value.score.weight) == 0 and value.score.bias is not None
    from transformers import AutoModelForCausalLM
    causal = AutoModelForCausalLM.from_pretrained(backbone_dir)
    torch.testing.assert_close(model.model.embed_tokens.weight, causal.model.embed_tokens.weight)


def test_a_scalar_head_saves_as_a_plain_transformers_classifier(backbone_dir, tmp_path):
    """Saved, a scalar RewardModel is LlamaForSequenceClassification with one label: a
    process that never imports rlhf_ext loads it with AutoModelForSequenceClassification
    and gets the same rewards; a value model can start from it; a value model saves and
    loads as ours."""
    import json
    import subprocess
    import sys

    model = RewardModel.from_backbone(str(backbone_dir), seed=5).eval()
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    ids = [[3, 8, 13, 21, eos], [3, 8, eos, pad, pad]]
    mask = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    model.save_pretrained(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["model_type"] == "llama" and config["pad_token_id"] == pad
    plain = subprocess.run([sys.executable, "-c", (
        "import json, sys, torch\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'rm')!r})\n"
        f"out = m(torch.tensor({ids}), attention_mask=torch.tensor({mask})).logits[:, 0]\n"
        "assert 'rlhf_ext' not in sys.modules\n"
        "print(json.dumps([type(m).__name__, out.tolist()]))")],
        capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    name, rewards = json.loads(plain.stdout.strip().splitlines()[-1])
    assert name == "LlamaForSequenceClassification"
    with torch.no_grad():
        want = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).rewards
    torch.testing.assert_close(torch.tensor(rewards), want, rtol=1e-5, atol=1e-6)
    # a value model from the saved reward model takes its backbone
    from_rm = ValueModel.from_backbone(str(tmp_path / "rm"))
    torch.testing.assert_close(from_rm.model.layers[1].mlp.up_proj.weight,
                               model.model.layers[1].mlp.up_proj.weight, rtol=0, atol=0)
    value = ValueModel.from_backbone(str(backbone_dir)).eval()
    value.save_pretrained(tmp_path / "vm")
    loaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "vm").eval()
    assert type(loaded) is ValueModel
    with torch.no_grad():
        out = loaded(torch.tensor(ids)).values
        assert out.shape == (2, 5)
        torch.testing.assert_close(out, value(torch.tensor(ids)).values, rtol=0, atol=0)


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
    # Qwen2's classifier names its weights as ours; GPT-2's calls the backbone transformer
    want = "RewardModel" if config_cls is GPT2Config else "Qwen2ForSequenceClassification"
    assert type(again).__name__ == want
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(rm(ids).rewards, scalar_rewards(again(ids)))
    # a LoRA reward adapter of either kind loads in one line, and scores as it was trained
    from peft import LoraConfig, get_peft_model

    from rlhf_ext.reward import is_native_classifier, load_reward_model

    target = ["c_attn"] if config_cls is GPT2Config else ["q_proj"]
    lora = get_peft_model(rm, LoraConfig(r=2, target_modules=target, modules_to_save=["score"],
                                         init_lora_weights=False)).eval()
    if is_native_classifier(rm):  # as RewardTrainer marks it
        lora.active_peft_config.task_type = "SEQ_CLS"
    lora.save_pretrained(tmp_path / "adapter")
    loaded = load_reward_model(str(tmp_path / "adapter"))
    assert type(loaded.get_base_model()).__name__ == want
    with torch.no_grad():
        trained = lora(ids).rewards
        with lora.disable_adapter():
            assert not torch.allclose(trained, lora(ids).rewards)
        torch.testing.assert_close(scalar_rewards(loaded(ids)), trained)


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
    assert any(isinstance(m, Linear4bit) for m in model.model.modules())
    assert model.score.weight.dtype == torch.float32
    # the new head beside the backbone (bitsandbytes puts a 4-bit model on a GPU if any)
    assert model.score.weight.device == model.model.norm.weight.device
    with torch.no_grad():
        out = model(torch.tensor([[3, 8, 13]], device=model.device)).rewards
    assert out.shape == (1,) and torch.isfinite(out).all()


def test_a_new_head_sits_beside_its_backbone(backbone_dir):
    """A fresh head takes the backbone's dtype (a bfloat16 model gets bfloat16 heads, not
    torch's default float32; the same seeded init, rounded) and its last layer's device
    (shown with the final norm on the meta device: the last GPU of a device map)."""
    from transformers import AutoModel

    from rlhf_ext.heads import head_placement

    kwargs = dict(objective_names=["a", "b"], combination="learned", seed=4)
    half = RewardModel.from_backbone(str(backbone_dir), dtype=torch.bfloat16, **kwargs)
    full = RewardModel.from_backbone(str(backbone_dir), **kwargs)
    for name in ("score", "gate"):
        assert getattr(half, name).weight.dtype == torch.bfloat16
        assert torch.equal(getattr(half, name).weight,
                           getattr(full, name).weight.to(torch.bfloat16))
    assert ValueModel.from_backbone(str(backbone_dir), dtype=torch.bfloat16).score.weight.dtype \
        == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(half(torch.tensor([[3, 8, 13]])).rewards).all()
    backbone = AutoModel.from_pretrained(backbone_dir)
    backbone.norm.to("meta")
    assert head_placement(backbone) == (torch.device("meta"), torch.float32)


def test_fsdp_finds_the_decoder_layers_to_shard(backbone_dir):
    """accelerate's FSDP wrap policy shards the classes a model's ``_no_split_modules``
    names: the head models inherit their backbone's, and PPO's policy-plus-value wrapper
    names its two models' (an empty list would make the whole model one unit)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_ext.ppo.trainer import PolicyAndValue

    value = ValueModel.from_backbone(str(backbone_dir))
    assert set(RewardModel.from_backbone(str(backbone_dir))._no_split_modules) == \
        set(value._no_split_modules) == {"LlamaDecoderLayer"}
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(backbone_dir),
                            LoraConfig(r=2, target_modules=["q_proj"]))
    assert PolicyAndValue(policy, value)._no_split_modules == ["LlamaDecoderLayer"]
    assert PolicyAndValue(policy, None)._no_split_modules == ["LlamaDecoderLayer"]
