"""Prefix-shared attention under sdpa runs per completion over [prompt | completion], from
the row layout, without the dense mask: same hidden states and gradients as each
completion in its own row, checkpointed layers included."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf_ext.logps import final_hidden
from rlhf_ext.shared_prefix import (
    SPANS,
    attention_inputs,
    check_spans_used,
    segment_spans,
    span_calls,
)


def test_segment_spans_by_hand():
    # left-padded prompt, three completions each followed by padding (a PPO group)
    seg = torch.tensor([[-1, 0, 0, 1, 1, -1, 2, -1, 3, 3, 3]])
    assert segment_spans(seg) == ((((1, 3), ((3, 5), (6, 7), (8, 11))),),)
    assert segment_spans(torch.tensor([[0, 0, 1, 1, 2]])) == ((((0, 2), ((2, 4), (4, 5))),),)
    assert segment_spans(torch.tensor([[0, 1, 0, 2]])) is None   # a prompt in two pieces
    assert segment_spans(torch.tensor([[1, 0, 0, 2]])) is None   # a completion before it
    # padding-free: two pairs in one row, named by group ids
    seg, groups = torch.tensor([[0, 0, 1, 2, 2, 0, 1, 1, 2]]), torch.tensor([[0] * 5 + [1] * 4])
    assert segment_spans(seg, groups) == ((((0, 2), ((2, 3), (3, 5))),
                                           ((5, 6), ((6, 8), (8, 9)))),)
    assert segment_spans(seg) is None  # without the groups: two prompts in one row


def tiny(checkpointing: bool):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="sdpa"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    return model


PROMPT, COMPLETIONS = [5, 6, 7, 8], [[11, 12, 13], [21, 22], [31, 32, 33, 34]]


def packed_row():
    """[pad | prompt | c1 | c2 pad | c3]: left padding, and padding between completions."""
    ids = [0] + PROMPT + COMPLETIONS[0] + COMPLETIONS[1] + [0] + COMPLETIONS[2]
    seg = [-1] + [0] * 4 + [1] * 3 + [2] * 2 + [-1] + [3] * 4
    pos = [0] + list(range(4)) + [4, 5, 6] + [4, 5] + [0] + [4, 5, 6, 7]
    return torch.tensor([ids]), torch.tensor([seg]), torch.tensor([pos])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_spans_give_the_separate_rows_values_and_gradients(checkpointing):
    model = tiny(checkpointing)
    weight = model.model.layers[0].self_attn.q_proj.weight
    ids, seg, pos = packed_row()
    inputs = attention_inputs("sdpa", seg, torch.float32)
    assert inputs[SPANS] == ((((1, 5), ((5, 8), (8, 10), (11, 15))),),)
    # the kernel path reads the spans only: a mask that blocks nothing changes nothing
    inputs["attention_mask"] = torch.ones(1, 1, 15, 15, dtype=torch.bool)
    shared = final_hidden(model, input_ids=ids, position_ids=pos, **inputs)[0]
    real = (seg[0] >= 0).nonzero()[:, 0]
    (g_shared,) = torch.autograd.grad(shared[real].square().sum(), weight)

    pieces = []  # the prompt once (from the first row), then each completion
    for k, completion in enumerate(COMPLETIONS):
        hidden = final_hidden(model, input_ids=torch.tensor([PROMPT + completion]))[0]
        pieces.append(hidden if k == 0 else hidden[len(PROMPT):])
    separate = torch.cat(pieces)
    (g_separate,) = torch.autograd.grad(separate.square().sum(), weight)
    torch.testing.assert_close(shared[real], separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_shared, g_separate, rtol=1e-4, atol=1e-5)

    # the all-true mask alone (no spans) lets completions see each other: it differs
    leaky = final_hidden(model, input_ids=ids, position_ids=pos,
                         attention_mask=inputs["attention_mask"])[0]
    assert (leaky[real] - separate).abs().max() > 1e-3


def test_spans_keep_packed_groups_apart():
    """Padding-free: two groups [prompt | c1 | c2] in one row, no padding. The spans alone
    (a mask that blocks nothing) give each group its separate rows' hidden states."""
    model = tiny(checkpointing=False)
    groups = [(PROMPT, COMPLETIONS[:2]), ([9, 10], [[41, 42, 43], [51]])]
    ids, seg, pos, group = [], [], [], []
    for g, (prompt, completions) in enumerate(groups):
        ids += prompt + sum(completions, [])
        seg += [0] * len(prompt) + [k + 1 for k, c in enumerate(completions) for _ in c]
        pos += list(range(len(prompt))) + [len(prompt) + i for c in completions
                                           for i in range(len(c))]
        group += [g] * (len(prompt) + sum(map(len, completions)))
    seg, group = torch.tensor([seg]), torch.tensor([group])
    inputs = attention_inputs("sdpa", seg, torch.float32, group)
    assert inputs[SPANS] == ((((0, 4), ((4, 7), (7, 9))), ((9, 11), ((11, 14), (14, 15)))),)
    assert inputs["attention_mask"].shape == (1, 1, 1, 1)  # no [N, N] mask for packed rows
    before = span_calls()
    with torch.no_grad():
        packed = final_hidden(model, input_ids=torch.tensor([ids]),
                              position_ids=torch.tensor([pos]), **inputs)[0]
        pieces = []
        for prompt, completions in groups:
            for k, completion in enumerate(completions):
                hidden = final_hidden(model, input_ids=torch.tensor([prompt + completion]))[0]
                pieces.append(hidden if k == 0 else hidden[len(prompt):])
    torch.testing.assert_close(packed, torch.cat(pieces), rtol=1e-5, atol=1e-5)
    assert span_calls() == before + 3  # one attention call per layer read the spans
    check_spans_used(before)
    with pytest.raises(RuntimeError, match="did not pass it on.*padding_free=False"):
        check_spans_used(span_calls())  # a forward whose layers dropped the spans
