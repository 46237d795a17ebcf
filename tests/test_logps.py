"""The log-prob optimisations keep the plain computation's values and gradients:
chunked log-softmax and LM head, the head only at completion positions, padding-free
packing, and prefix sharing (chosen and rejected in one row over one prompt)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_ext.data import PreferenceCollator
from rlhf_ext.logps import head_logps, sequence_logps, token_logps
from rlhf_ext.shared_prefix import additive_mask, prefix_sharing_mask


def plain_logps(logits, labels):
    return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 512])
def test_chunked_token_logps_match_log_softmax(dtype, chunk):
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 11, 97)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 97, (3, 11))
    weights = torch.randn(3, 11)
    got = token_logps(logits, labels, chunk_size=chunk)
    (g_got,) = torch.autograd.grad((got * weights).sum(), logits)
    want = plain_logps(logits, labels)
    (g_want,) = torch.autograd.grad((want * weights).sum(), logits)
    assert got.dtype == torch.float32 and got.shape == (3, 11)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got.float(), g_want.float(), rtol=1e-2, atol=1e-3)


def test_temperature_divides_the_logits():
    logits, labels = torch.randn(2, 5, 13), torch.randint(0, 13, (2, 5))
    torch.testing.assert_close(token_logps(logits, labels, 0.7, chunk_size=3),
                               plain_logps(logits / 0.7, labels))


def tiny_llama(attn_implementation="sdpa"):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, attn_implementation=attn_implementation)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def rows():
    """Paired rows of different prompt and completion lengths (tokenized dataset rows)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for p, c, r in ((5, 3, 9), (12, 6, 2), (2, 10, 4)):
        ids = lambda n: torch.randint(1, 300, (n,), generator=g).tolist()  # noqa: E731
        out.append({"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)})
    return out


def full_logits_reference(model, batch):
    """The unoptimised computation: logits at every position, log-softmax, mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"), use_cache=False).logits
    per_token = plain_logps(logits[:, :-1], batch["input_ids"][:, 1:])
    mask = batch["completion_mask"][:, 1:].float()
    if "sequence_ids" not in batch:
        return (per_token * mask).sum(-1)
    ids = batch["sequence_ids"][0, 1:]
    return torch.zeros(int(ids.max()) + 1).index_add(0, ids, (per_token * mask)[0])


@pytest.mark.parametrize("padding_free", [False, True])
def test_completion_only_logps_match_full_logits(model, padding_free):
    batch = PreferenceCollator(0, 64, padding_free=padding_free)(rows())
    args = (batch["input_ids"], batch.get("attention_mask"), batch["completion_mask"],
            batch.get("position_ids"), batch.get("sequence_ids"))
    got, counts = sequence_logps(model, *args)
    want = full_logits_reference(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [3, 6, 10, 9, 2, 4]  # chosen rows, then rejected rows
    # gradients through the model agree too
    (g_got,) = torch.autograd.grad(sequence_logps(model, *args)[0].sum(),
                                   model.model.layers[0].mlp.up_proj.weight)
    (g_want,) = torch.autograd.grad(full_logits_reference(model, batch).sum(),
                                    model.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_padding_free_equals_padded(model):
    padded = PreferenceCollator(0, 64)(rows())
    packed = PreferenceCollator(0, 64, padding_free=True)(rows())
    a, _ = sequence_logps(model, padded["input_ids"], padded["attention_mask"],
                          padded["completion_mask"])
    b, _ = sequence_logps(model, packed["input_ids"], None, packed["completion_mask"],
                          packed["position_ids"], packed["sequence_ids"])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()


def test_prefix_sharing_mask_by_hand():
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    m = prefix_sharing_mask(seg)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0],
                 [1, 1, 1, 0, 0, 0],
                 [1, 1, 1, 1, 0, 0],
                 [1, 1, 0, 0, 1, 0],   # rejected: the prompt and itself, not the chosen
                 [1, 1, 0, 0, 0, 0]]   # padding: the prompt only
    # two pairs in one row (padding-free): each token sees its own pair only
    seg, pair = torch.tensor([[0, 1, 2, 0, 1, 2]]), torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert prefix_sharing_mask(seg, pair)[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                                                   [1, 1, 0, 0, 0, 0],
                                                                   [1, 0, 1, 0, 0, 0],
                                                                   [0, 0, 0, 1, 0, 0],
                                                                   [0, 0, 0, 1, 1, 0],
                                                                   [0, 0, 0, 1, 0, 1]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("max_length", [64, 9])  # 9 cuts some completions
@pytest.mark.parametrize("padding_free", [False, True])
def test_prefix_sharing_matches_separate_sequences(attention, max_length, padding_free):
    model = tiny_llama(attention)
    padded = PreferenceCollator(0, max_length)(rows())
    shared = PreferenceCollator(0, max_length, padding_free=padding_free,
                                prefix_sharing=True)(rows())
    # one row per pair, or all three pairs in one row without padding
    assert shared["input_ids"].shape[0] == (1 if padding_free else 3)
    assert shared["input_ids"].numel() < padded["input_ids"].numel()
    if padding_free:  # every token real: each pair's prompt once and both completions, cut
        kept = [len(r["prompt_ids"][:max_length]) for r in rows()]
        assert shared["input_ids"].numel() == sum(
            n + min(len(r["chosen_ids"]), max_length - n)
            + min(len(r["rejected_ids"]), max_length - n) for n, r in zip(kept, rows()))
    weight = model.model.layers[0].mlp.up_proj.weight
    a, count_a = sequence_logps(model, padded["input_ids"], padded["attention_mask"],
                                padded["completion_mask"])
    (g_a,) = torch.autograd.grad(a.sum(), weight)
    b, count_b = sequence_logps(model, shared["input_ids"], None, shared["completion_mask"],
                                shared["position_ids"], shared.get("sequence_ids"),
                                segment_ids=shared["segment_ids"])
    (g_b,) = torch.autograd.grad(b.sum(), weight)
    assert count_a.tolist() == count_b.tolist()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_a, g_b, rtol=1e-4, atol=1e-6)


def test_prefix_sharing_eager_in_bfloat16():
    """The additive mask takes the model's dtype: a bfloat16 eager model blocks too."""
    eager, sdpa = tiny_llama("eager").bfloat16(), tiny_llama("sdpa").bfloat16()
    shared = PreferenceCollator(0, 64, prefix_sharing=True)(rows())
    args = (shared["input_ids"], None, shared["completion_mask"], shared["position_ids"])
    with torch.no_grad():
        a, _ = sequence_logps(eager, *args, segment_ids=shared["segment_ids"])
        b, _ = sequence_logps(sdpa, *args, segment_ids=shared["segment_ids"])
    torch.testing.assert_close(a, b, rtol=0, atol=0.01)  # bf16 rounding; the leak was 0.09


def test_additive_mask_by_hand():
    allowed = torch.tensor([[[[True, False], [True, True]]]])
    got = additive_mask(allowed, torch.bfloat16)
    low = torch.finfo(torch.bfloat16).min
    assert got.dtype == torch.bfloat16 and got[0, 0].tolist() == [[0, low], [0, 0]]


def test_head_token_stats_by_hand():
    """Entropy, mean logit, top-1 and log sum p^2 of p = (1/2, 1/4, 1/4), from the same
    blocks as the log-prob, carry no gradient, and leave the log-prob's gradient as it is."""
    import math

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    logits.requires_grad_(True)  # the head is the identity: these rows are the logits
    targets = torch.tensor([0, 2])
    stats = ("entropy", "mean_logit", "top1", "log_sum_sq")
    logps, got = head_logps(logits, torch.nn.Identity(), targets, chunk_size=1, stats=stats)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert logps.tolist() == pytest.approx([math.log(0.5), math.log(0.25)])
    assert got["entropy"].tolist() == pytest.approx([entropy, entropy])
    assert got["mean_logit"].tolist() == pytest.approx([(math.log(0.5) + 2 * math.log(0.25)) / 3] * 2)
    assert got["top1"].tolist() == [1.0, 0.0]
    assert got["log_sum_sq"].tolist() == pytest.approx([math.log(0.375)] * 2)
    assert not any(v.requires_grad for v in got.values())
    grad, = torch.autograd.grad(logps.sum(), logits)
    plain, = torch.autograd.grad(head_logps(logits, torch.nn.Identity(), targets).sum(), logits)
    torch.testing.assert_close(grad, plain)
    with torch.no_grad():  # the in-place path (fresh blocks, temperature) gives the same
        cold, cold_stats = head_logps(logits * 2, torch.nn.Identity(), targets,
                                      temperature=2.0, stats=stats)
    torch.testing.assert_close(cold, logps.detach())
    for name in stats:
        torch.testing.assert_close(cold_stats[name], got[name])


def test_chunked_head_logps_match_and_train_the_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(13, 16, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    got = head_logps(hidden, head, targets, chunk_size=4)
    g_got = torch.autograd.grad(got.sum(), [hidden, head.weight])
    want = plain_logps(head(hidden)[None], targets[None])[0]
    g_want = torch.autograd.grad(want.sum(), [hidden, head.weight])
    torch.testing.assert_close(got, want)
    for x, y in zip(g_got, g_want):
        torch.testing.assert_close(x, y)


def test_head_chunk_size_by_device():
    """128 positions on a CPU whatever the vocabulary; on a GPU the largest power of two
    whose float32 [chunk, V] block fits in 256 MiB (2^28 / (4 V)), at least 128."""
    from rlhf_ext.logps import head_chunk_size

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert head_chunk_size(cpu, 49_152) == head_chunk_size(cpu, 128_256) == 128
    assert head_chunk_size(gpu, 49_152) == 1024  # 2^28 / (4 * 49152) = 1365.3
    assert head_chunk_size(gpu, 128_256) == 512  # 523.3
    assert head_chunk_size(gpu, 151_936) == 256  # Qwen2.5: 441.7
    assert head_chunk_size(gpu, 1_000_000) == 128  # 67.1, raised to the floor
