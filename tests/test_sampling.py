"""The sampler of generate_completions: inverse-CDF draws from softmax(logits / T)
restricted by top-k/top-p, in place of torch.multinomial."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from rlhf_ext.sampling import (
    InverseCdfSampling,
    generate_completions,
    inverse_cdf_sample,
    row_seeds,
)


def test_inverse_cdf_at_hand_computed_points():
    """weights [0, 1, 0, 3, 0]: CDF 0, 1, 1, 4, 4 (blocks of 2); target u * 4."""
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0]]).expand(6, -1)
    uniform = torch.tensor([0.0, 0.2, 0.249, 0.25, 0.9999, 1.0])  # 1.0: rounding's worst case
    got = inverse_cdf_sample(weights, uniform, block=2)
    assert got.tolist() == [1, 1, 1, 3, 3, 3]  # never a token of weight 0


@pytest.mark.parametrize("block", [4, 64, 256])
def test_inverse_cdf_frequencies_are_the_weights(block):
    """50,000 draws over 300 entries (a zero block, zeros inside blocks, one heavy entry):
    every frequency within 5 standard errors of its probability, zeros never drawn."""
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(300, generator=g) ** 4
    weights[40:80] = 0.0
    weights[::7] = 0.0
    weights[123] = 30.0
    p = weights / weights.sum()
    n = 50_000
    draws = inverse_cdf_sample(weights.expand(n, -1), torch.rand(n, generator=g), block=block)
    freq = torch.bincount(draws, minlength=300).double() / n
    se = (p * (1 - p) / n).sqrt().double()
    assert freq[p == 0].sum() == 0
    assert ((freq - p.double()).abs() <= 5 * se + 1e-12).all()


def test_processor_draws_from_the_warped_softmax():
    """Temperature 0.5, top-k 3 and top-p 0.9 on fixed logits: the processor's argmax is
    a draw from transformers' own warped distribution."""
    torch.manual_seed(1)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.8]])
    warped = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(3)(None, logits / 0.5))
    p = torch.softmax(warped, -1)[0]
    assert (p > 0).sum() == 2  # top-p keeps 2 of top-k's 3: hand-checkable support
    n = 40_000
    sampling = InverseCdfSampling(0.5, 3, 0.9)
    sampling.start(row_seeds(0, None, n))  # n rows, n streams
    scores = sampling(None, logits.expand(n, -1).clone())
    assert ((scores == 0).sum(1) == 1).all() and torch.isinf(scores).sum() == n * 5
    freq = torch.bincount(scores.argmax(1), minlength=6).double() / n
    se = (p * (1 - p) / n).sqrt().double()
    assert ((freq - p.double()).abs() <= 5 * se + 1e-12).all(), (freq, p)


def tiny_lm():
    """A one-layer Llama over 16 words ("t0" pad, "t1" eos) with a peaked next-token
    distribution, and its tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(16)}, "t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", eos_token="t1")
    assert tok("t5 t6", add_special_tokens=False)["input_ids"] == [5, 6]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, pad_token_id=0,
                                         eos_token_id=1, bos_token_id=None)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # a peaked distribution, far from uniform
    return model, tok


def test_generate_completions_samples_the_models_next_token_distribution():
    """One new token from a tiny Llama: the empirical next-token frequencies over 4,000
    rows match the model's softmax; the same seed gives the same samples."""
    model, tok = tiny_lm()
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([[5, 6]])).logits[0, -1], -1)
    n = 4000
    out = generate_completions(model, tok, ["t5 t6"] * n, max_new_tokens=1, batch_size=n,
                               seed=3)
    again = generate_completions(model, tok, ["t5 t6"] * n, max_new_tokens=1, batch_size=n,
                                 seed=3)
    assert out.ids == again.ids
    freq = torch.bincount(torch.tensor([ids[0] for ids in out.ids]), minlength=16) / n
    se = (p * (1 - p) / n).sqrt()
    assert p.max() < 0.9 and (p > 0.02).sum() >= 3  # several likely tokens to tell apart
    assert ((freq - p).abs() <= 5 * se + 1e-6).all(), (freq, p)


def test_a_rows_samples_depend_on_its_key_not_its_batch():
    """Six prompts of different lengths sampled at once, or split as two processes split
    them (rows 0-2 and 3-5, keyed by their global positions) in batches of 2: the same
    tokens; rows of one prompt differ (streams of their own); a key's stream is not a
    shifted neighbour's (seed + key would make these equal)."""
    from rlhf_ext.sampling import row_seed

    model, tok = tiny_lm()
    prompts = ["t5 t6", "t5 t6", "t7", "t9 t3 t4", "t7", "t2 t8"]
    kw = dict(max_new_tokens=6, temperature=1.0, seed=7)
    whole = generate_completions(model, tok, prompts, **kw)
    first = generate_completions(model, tok, prompts[:3], **kw, batch_size=2)
    second = generate_completions(model, tok, prompts[3:], **kw, batch_size=2,
                                  row_keys=range(3, 6))
    assert first.ids + second.ids == whole.ids
    unkeyed = generate_completions(model, tok, prompts[3:], **kw)  # keys 0-2: other draws
    assert unkeyed.ids != second.ids
    many = generate_completions(model, tok, ["t5 t6"] * 8, **kw)
    assert len({tuple(ids) for ids in many.ids}) > 1
    assert row_seed(7, 1) != row_seed(8, 0) and row_seed(7, 0) != row_seed(7, 1)
    with pytest.raises(ValueError, match="2 keys for 6 prompts"):
        generate_completions(model, tok, prompts, **kw, row_keys=[0, 1])


def test_grouped_heads_attention_equals_transformers_without_copying_the_heads():
    """A masked call of a grouped-query layer (6 query heads, 2 key/value heads, left
    padding, a decoding step and a prefill): the same output as transformers' own SDPA,
    which repeats each key/value head three times first. Cases it leaves to transformers
    (None): with a gradient, without a mask, with dropout, with a position bias, equal heads."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from rlhf_ext.shared_prefix import grouped_heads_sdpa

    layer = torch.nn.Module()
    layer.num_key_value_groups, layer.is_causal = 3, True
    g = torch.Generator().manual_seed(0)
    for q_len, k_len in [(1, 9), (7, 7)]:
        query = torch.randn(3, 6, q_len, 8, generator=g)
        key, value = torch.randn(2, 3, 2, k_len, 8, generator=g)
        real = torch.ones(3, k_len, dtype=torch.bool)
        real[1, :2] = real[2, :4] = False  # left padding
        mask = real[:, None, None, :] & torch.ones(q_len, k_len, dtype=torch.bool).tril(
            k_len - q_len)
        want, _ = sdpa_attention_forward(layer, query, key, value, mask, scaling=0.3)
        with torch.no_grad():
            got, none = grouped_heads_sdpa(layer, query, key, value, mask, scaling=0.3)
        assert none is None and got.shape == (3, q_len, 6, 8)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert got.is_contiguous()
    assert grouped_heads_sdpa(layer, query, key, value, mask) is None  # gradient mode
    with torch.no_grad():
        assert grouped_heads_sdpa(layer, query, key, value, None) is None
        assert grouped_heads_sdpa(layer, query, key, value, mask, dropout=0.1) is None
        assert grouped_heads_sdpa(layer, query, key, value, mask,
                                  position_bias=torch.zeros(1)) is None
        assert grouped_heads_sdpa(layer, query, key.repeat(1, 3, 1, 1),
                                  value.repeat(1, 3, 1, 1), mask) is None


def test_sampling_a_grouped_query_model_takes_the_copy_free_attention(monkeypatch):
    """generate_completions on a two-layer Llama with 4 query and 2 key/value heads,
    prompts of different lengths (left padding): every masked attention call of the
    prefill and the decoding steps goes through grouped_heads_sdpa, and the tokens and
    their log-probs are those of transformers' own attention."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import rlhf_ext.shared_prefix as shared_prefix

    # as in a fresh process: transformers' own sdpa, until the sampler installs ours
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", sdpa_attention_forward)
    monkeypatch.setattr(shared_prefix, "_installed", False)
    _, tok = tiny_lm()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, pad_token_id=0,
                                         eos_token_id=1, bos_token_id=None,
                                         attn_implementation="sdpa")).eval()
    prompts = ["t5 t6", "t7", "t9 t3 t4 t2", "t5 t6"]
    kw = dict(max_new_tokens=8, temperature=1.0, seed=5, return_logps=True)
    calls = []
    grouped = shared_prefix.grouped_heads_sdpa

    def counted(*args, **kwargs):
        out = grouped(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(shared_prefix, "grouped_heads_sdpa", counted)
    fast = generate_completions(model, tok, prompts, **kw)
    assert len(calls) >= 2 * 8 and all(calls)  # 2 layers x (the prefill and 7 steps)
    monkeypatch.setattr(shared_prefix, "grouped_heads_sdpa", lambda *a, **k: None)
    plain = generate_completions(model, tok, prompts, **kw)
    assert fast.ids == plain.ids  # the same kernel: equal here to the last bit
    for a, b in zip(fast.logps, plain.logps):
        assert a == pytest.approx(b, rel=0, abs=1e-6)
    assert len({tuple(ids) for ids in fast.ids}) > 1
