"""The importance-sampling correction for vLLM's sampling (ppo.sampler_correction), by hand,
and the vLLM fields' checks."""

import math

import pytest
import torch

import rlhf_ext
from rlhf_ext.ppo.sampler_correction import sampler_gaps, sampler_weights

T = torch.tensor
# two responses: 3 real tokens, then 2 real tokens and padding
OLD = T([[-1.0, -2.0, -0.5], [-0.2, -0.3, 0.0]])
SAMPLER = T([[-1.5, -1.0, -0.5], [-1.2, -0.3, -9.0]])
MASK = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
# old - sampler on real tokens: row 0: 0.5, -1.0, 0.0 (sum -0.5); row 1: 1.0, 0.0 (sum 1.0)


def test_token_modes_weigh_each_token_by_exp_of_its_gap():
    e = math.exp
    w = sampler_weights(OLD, SAMPLER, MASK, "token_truncate", None, 2.0)
    torch.testing.assert_close(w, T([[e(0.5), e(-1.0), 1.0], [2.0, 1.0, 0.0]]))  # e^1 > 2
    w = sampler_weights(OLD, SAMPLER, MASK, "token_truncate", 0.5, 3.0)
    torch.testing.assert_close(w, T([[e(0.5), 0.5, 1.0], [e(1.0), 1.0, 0.0]]))  # e^-1 < 0.5
    w = sampler_weights(OLD, SAMPLER, MASK, "token_mask", 0.5, 2.0)
    torch.testing.assert_close(w, T([[e(0.5), 0.0, 1.0], [0.0, 1.0, 0.0]]))


def test_sequence_modes_weigh_every_token_by_the_sequences_ratio():
    e = math.exp
    w = sampler_weights(OLD, SAMPLER, MASK, "sequence_truncate", None, 2.0)
    torch.testing.assert_close(w, T([[e(-0.5)] * 3, [2.0, 2.0, 0.0]]))
    w = sampler_weights(OLD, SAMPLER, MASK, "sequence_mask", None, 2.0)  # TRL's default mode
    torch.testing.assert_close(w, T([[e(-0.5)] * 3, [0.0, 0.0, 0.0]]))
    w = sampler_weights(OLD, SAMPLER, MASK, "sequence_mask", 0.7, None)  # e^-0.5 = 0.61 < 0.7
    torch.testing.assert_close(w, T([[0.0] * 3, [e(1.0), e(1.0), 0.0]]))


def test_a_token_the_sampler_did_not_score_counts_as_no_gap():
    sampler = SAMPLER.clone()
    sampler[0, 1] = float("nan")
    w = sampler_weights(OLD, sampler, MASK, "token_truncate", None, None)
    torch.testing.assert_close(w[0], T([math.exp(0.5), 1.0, 1.0]))
    gaps, _ = sampler_gaps(OLD, sampler, w, MASK, "token_truncate")
    torch.testing.assert_close(gaps, T([0.5, 0.0, 1.0, 0.0]))  # the NaN token left out


def test_metrics_read_the_gaps_of_real_tokens_and_one_ratio_per_token_or_sequence():
    w = sampler_weights(OLD, SAMPLER, MASK, "token_truncate", None, None)
    gaps, ratios = sampler_gaps(OLD, SAMPLER, w, MASK, "token_truncate")
    torch.testing.assert_close(gaps, T([0.5, 1.0, 0.0, 1.0, 0.0]))  # padding's 9 left out
    torch.testing.assert_close(ratios, torch.exp(T([0.5, -1.0, 0.0, 1.0, 0.0])))
    w = sampler_weights(OLD, SAMPLER, MASK, "sequence_truncate", None, None)
    _, ratios = sampler_gaps(OLD, SAMPLER, w, MASK, "sequence_truncate")
    torch.testing.assert_close(ratios, torch.exp(T([-0.5, 1.0])))


def test_the_correction_multiplies_the_policy_loss_per_token():
    """What the trainer passes to core.policy_loss: the weights scale each token's loss."""
    from rlhf_ext.ppo import core

    logps = OLD.clone().requires_grad_()
    adv = T([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])
    w = sampler_weights(OLD, SAMPLER, MASK, "token_truncate", None, 2.0)
    loss, _ = core.policy_loss(logps, OLD, adv, MASK, 0.2, "token_mean", token_weights=w)
    # ratio 1 at the old log-probs: each token's loss is -advantage, times its weight
    expected = (-(adv * w) * MASK).sum() / MASK.sum()
    torch.testing.assert_close(loss, expected)


def test_vllm_fields_are_checked_when_the_config_is_built():
    base = dict(output_dir="x", use_cpu=True, use_vllm=True)
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode must be one of"):
        rlhf_ext.PPOConfig(**base, vllm_importance_sampling_mode="token")
    with pytest.raises(ValueError, match="must be less than"):
        rlhf_ext.PPOConfig(**base, vllm_importance_sampling_clip_min=2.0,
                           vllm_importance_sampling_clip_max=1.5)
    with pytest.raises(ValueError, match="vllm_mode must be colocate or server"):
        rlhf_ext.GRPOConfig(**base, vllm_mode="remote")
    # one optimizer step per rollout: the update's own log-probs are the old ones, for
    # the correction too (no scoring forward of the policy in the rollout)
    args = rlhf_ext.GRPOConfig(**base, per_device_train_batch_size=8, num_generations=8)
    assert not args.needs_rollout_logps
    assert rlhf_ext.GRPOConfig(**base, vllm_importance_sampling_cap=2.5
                               ).vllm_importance_sampling_clip_max == 2.5


def dequantized_twin(policy, folder):
    """``policy`` (LoRA on a 4-bit base) rebuilt in float32: each 4-bit weight dequantized
    by bitsandbytes, the same adapters on top, through peft's own LoRA forward."""
    import bitsandbytes as bnb
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    twin = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                          policy.peft_config["default"])
    own = twin.state_dict()
    weights = {}
    for name, module in policy.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights[f"{name}.weight"] = bnb.functional.dequantize_4bit(
                module.weight.data, module.weight.quant_state).float()
    weights.update({k: v for k, v in policy.state_dict().items() if "lora_" in k})
    assert set(weights) <= set(own)
    twin.load_state_dict(weights, strict=False)
    return twin.eval()


@pytest.mark.parametrize("four_bit", [False, True])
def test_merged_weights_reproduce_a_lora_policy_in_a_plain_model(tok, tmp_path, four_bit):
    """What vLLM is given (vllm_engine.merged_weights): loaded into a plain copy of the
    architecture, the LoRA policy's logits, on a 4-bit base too (dequantized). The policy
    itself is left as it was."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_ext.models import quantization_config
    from rlhf_ext.vllm_engine import checkpoint
    from rlhf_ext.worlds.tiny import build_model

    build_model("tiny4bit", tok, seed=0).save_pretrained(tmp_path)
    quant = quantization_config(load_in_4bit=True, compute_dtype=torch.float32) if four_bit \
        else None
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quant), LoraConfig(
        r=4, target_modules="all-linear", init_lora_weights=False))
    state = {k: v.clone() for k, v in policy.state_dict().items() if v.is_floating_point()}
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    weights = checkpoint(policy)
    assert not any("lora" in k or "base_layer" in k for k in weights)
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    assert not unexpected and not missing
    ids = torch.tensor([tok("the film was good and the story")["input_ids"]])
    reference = policy
    if four_bit:  # bitsandbytes' CPU 4-bit matmul rounds differently by CPU (logits 2e-3
        # from the float32 dequantized product on an AVX512-BF16 machine, 1e-6 on an
        # AVX2 one): the reference is peft's LoRA on the dequantized base in float32
        reference = dequantized_twin(policy, tmp_path)
    with torch.no_grad():
        ours, theirs = plain(ids).logits, reference(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits
    assert (ours - base).abs().max() > 1e-2  # the adapters change the outputs...
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)  # ...as merged
    for k, v in policy.state_dict().items():
        if k in state:
            assert torch.equal(v, state[k]), k
