"""4-bit (bitsandbytes) models behave the same on every CPU of this project's kind.

On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit weights for an inference
kernel at the first eval-mode forward without gradients; that kernel has no backward and
needs kernel-friendly shapes. ``models.keep_4bit_differentiable`` keeps every layer on the
generic kernel. Which CPU runs these tests decides nothing: on a CPU without AVX512-BF16
the repacking never happens, and the assertions hold all the same.
"""

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from peft import LoraConfig
from transformers import AutoTokenizer

from rlhf_ext.models import add_adapters, load_causal_lm, quantization_config
from rlhf_ext.worlds.tiny import build_model

QUANT = quantization_config(load_in_4bit=True, compute_dtype=torch.float32)
IDS = torch.tensor([[5, 9, 17, 33, 40, 41], [7, 8, 9, 10, 11, 12]])


@pytest.fixture(scope="module")
def model_dirs(world_dir, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    root = tmp_path_factory.mktemp("quant")
    for size in ("tiny", "tiny4bit"):
        build_model(size, tok, seed=0).save_pretrained(root / size)
    return root


def test_layers_the_packed_kernel_cannot_take_still_run(model_dirs):
    """hidden 32 < one 64-value quantization block: bitsandbytes' repacking fails with
    "shape '[32, 0]' is invalid" on AVX512-BF16 CPUs; here it must run and agree with
    itself and with the train-mode (never repacked) forward."""
    model = load_causal_lm(str(model_dirs / "tiny"), quantization_config=QUANT)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(not m.support_avx512bf16_for_cpu for m in layers)
    with torch.no_grad():
        train_mode = model.train()(IDS.to(model.device)).logits  # bitsandbytes' device
        eval_mode = model.eval()(IDS.to(model.device)).logits
    assert torch.isfinite(eval_mode).all()
    torch.testing.assert_close(eval_mode, train_mode, rtol=0, atol=0)


def lora_grads(model) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(IDS.to(model.device)).logits.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lora_gradients_survive_an_eval_forward(model_dirs):
    """The repacked kernel has no backward: after one eval forward (a rollout, an
    evaluation) every LoRA adapter below a 4-bit layer would get no gradient."""
    base = load_causal_lm(str(model_dirs / "tiny4bit"), quantization_config=QUANT)
    model = add_adapters(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                          target_modules=["q_proj", "v_proj"]), seed=0)
    before = lora_grads(model)
    assert len(before) == 8  # A and B of q and v in both layers
    with torch.no_grad():
        model.eval()(IDS.to(model.device))
    after = lora_grads(model)
    assert set(after) == set(before)
    for name, grad in before.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(after[name], grad, rtol=1e-5, atol=1e-7, msg=name)
