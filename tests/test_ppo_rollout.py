"""The rollout's memory follows local_rollout_forward_batch_size, not the rollout batch, and
its chunked, completion-only scoring equals the full-logits computation."""

import copy
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlhf_ext.heads import ValueModel
from rlhf_ext.ppo import PPOConfig
from rlhf_ext.ppo.rollout import response_logps, rollout

VOCAB = 131072  # a large vocabulary (Qwen2.5 has 151,936): the logits dominate memory
PROMPT, RESPONSE, CHUNK = 12, 16, 4
MIB = 2**20


def status_mib(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def peak_during(fn) -> float:
    """MiB of resident memory above the start that ``fn()`` reached at its peak (Linux:
    writing 5 to clear_refs resets the peak, VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_mib("VmRSS")
    fn()
    return status_mib("VmHWM") - before


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(VOCAB)}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="w0", eos_token="w1",
                                   unk_token="w0")


def test_rollout_memory_follows_the_forward_chunk(tmp_path):
    """Measured in a fresh process: inside a pytest worker, heap that earlier tests freed
    but kept can absorb one batch's allocations and not the other's, so the two peaks were
    not comparable (a CI run measured 32 MiB at batch 8 and 64 at 32; alone, both are 64)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(rollout_memory_and_scoring, tmp_path).result()


def rollout_memory_and_scoring(tmp_path):
    torch.manual_seed(0)
    tok = word_tokenizer()
    policy = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False))
    ref = copy.deepcopy(policy)
    policy.save_pretrained(tmp_path / "base")
    value = ValueModel.from_backbone(str(tmp_path / "base"))
    args = PPOConfig(
        output_dir=str(tmp_path / "out"), response_length=RESPONSE, temperature=0.9,
        local_rollout_forward_batch_size=CHUNK, rollout_batch_size=32, report_to="none",
        use_cpu=True)
    rng = random.Random(0)
    results = {}

    def run(batch: int):
        prompts = [" ".join(f"w{rng.randrange(2, VOCAB)}" for _ in range(PROMPT))
                   for _ in range(batch)]
        results[batch] = rollout(
            policy=policy, reference=lambda b: response_logps(ref, b, args.temperature),
            value_model=value, tokenizer=tok, rows=[{"prompt": p} for p in prompts],
            score=lambda rows, c, ids: (torch.tensor([[float(len(x))] for x in c]),
                                        torch.tensor([float(len(x)) for x in c])),
            args=args, kl_coef=0.1, moments=None, seed=0)

    run(CHUNK)  # warm-up: first-call allocations
    peaks = {batch: peak_during(lambda b=batch: run(b)) for batch in (8, 32)}
    # what the rollout used to build per chunk: logits at every position of [prompt | response]
    chunk_logits = CHUNK * (PROMPT + RESPONSE) * VOCAB * 4 / MIB  # 56 MiB
    assert peaks[32] < 2 * chunk_logits, peaks            # the old rollout: ~1,600 MiB here
    assert peaks[32] < peaks[8] + 0.5 * chunk_logits, peaks  # flat in the rollout batch

    # chunked, response-only log-probs and entropy equal the full-logits ones
    out = results[8].experience
    mask = out["response_mask"]
    with torch.no_grad():
        logits = policy(input_ids=out["input_ids"], attention_mask=out["attention_mask"],
                        position_ids=out["position_ids"]).logits.float() / args.temperature
    p = int(out["prompt_width"][0])
    logp_all = torch.log_softmax(logits[:, p - 1:-1], -1)
    full = logp_all.gather(-1, out["input_ids"][:, p:, None])[..., 0] * mask
    torch.testing.assert_close(out["old_logps"], full, rtol=0, atol=2e-5)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    expected = ((entropy * mask).sum() / mask.sum()).item()
    assert abs(results[8].metrics["objective/entropy"] - expected) < 1e-4
    assert out["old_values"].shape == mask.shape == (8, out["input_ids"].shape[1] - p)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prefix_shared_groups_equal_the_padded_rows(world_dir, attention):
    """Three prompts of different lengths, three samples each (lengths 1 to 7, some cut
    without eos): the log-probs and entropies from one packed row per group equal those of
    the padded rows."""
    from transformers import AutoTokenizer

    from rlhf_ext.ppo.rollout import build_batch, pack_groups
    from rlhf_ext.worlds.tiny import build_model

    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    model = build_model("tiny", tok, seed=0)
    model.config._attn_implementation = attention
    model.eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tok), (n,), generator=gen).tolist() for n in (3, 6, 4)]
    lengths = [1, 7, 4, 5, 2, 7, 3, 3, 6]
    responses = [torch.randint(3, len(tok), (n,), generator=gen).tolist() for n in lengths]
    batch = build_batch(tok, [p for p in prompts for _ in range(3)], responses, "cpu")
    with torch.no_grad():
        padded = response_logps(model, batch, 0.8, with_entropy=True)
        shared = response_logps(model, batch, 0.8, with_entropy=True, group=3)
    for a, b in zip(padded, shared):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-5)
    assert (padded[0] != 0).sum() == sum(lengths)
    packed = pack_groups(batch, 3)
    assert packed["input_ids"].shape == (3, batch.prompt_width + 3 * 7)
    # the second group's prompt has 6 real tokens: each response restarts at position 6
    c = batch.prompt_width
    assert packed["position_ids"][1, c].item() == packed["position_ids"][1, c + 7].item() == 6
    with pytest.raises(ValueError, match="share one prompt"):
        response_logps(model, batch, 0.8, group=9)


def test_value_head_on_policy_shares_the_policys_forward(world_dir):
    """``value_head_on_policy``: the values come from the hidden states of the forward that
    gives the log-probs, and equal the head's own forward of the policy (the state before
    each response token; 0 on padding), padded or prefix-shared; the gradient of a loss on
    both, through one forward, equals the one through two."""
    from transformers import AutoTokenizer

    from rlhf_ext.ppo.policy_value import PolicyValueHead
    from rlhf_ext.ppo.rollout import build_batch, response_values
    from rlhf_ext.worlds.tiny import build_model

    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    model = build_model("tiny", tok, seed=0).eval()
    head = PolicyValueHead(model, model.config.hidden_size)
    torch.nn.init.normal_(head.head.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    torch.nn.init.constant_(head.head.bias, 0.3)
    assert [n for n, _ in head.named_parameters()] == ["head.weight", "head.bias"]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tok), (n,), generator=gen).tolist() for n in (3, 6, 4)]
    lengths = [1, 7, 4, 5, 2, 7, 3, 3, 6]
    responses = [torch.randint(3, len(tok), (n,), generator=gen).tolist() for n in lengths]
    batch = build_batch(tok, [p for p in prompts for _ in range(3)], responses, "cpu")
    mask = batch.response_mask

    logps, values = response_logps(model, batch, 0.8, value_head=head)
    plain = response_logps(model, batch, 0.8)
    separate = response_values(head, batch)
    torch.testing.assert_close(logps, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(values, separate * mask, rtol=0, atol=1e-5)
    assert (values[mask == 0] == 0).all() and (values[mask == 1] != 0).all()
    with torch.no_grad():
        _, _, shared = response_logps(model, batch, 0.8, True, group=3, value_head=head)
    torch.testing.assert_close(shared, values.detach(), rtol=0, atol=2e-5)

    weights = torch.linspace(-1, 1, mask.numel()).view(mask.shape) * mask
    one = ((logps + values ** 2) * weights).sum()
    grads_one = torch.autograd.grad(one, [p for p in model.parameters()] + [head.head.weight])
    two = ((response_logps(model, batch, 0.8) + response_values(head, batch) ** 2)
           * weights).sum()
    grads_two = torch.autograd.grad(two, [p for p in model.parameters()] + [head.head.weight])
    for a, b in zip(grads_one, grads_two):  # float32 sums in another order: 1e-4 of the scale
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())
