"""Rollouts: prompts -> sampled responses -> scores, old/reference log-probs, values ->
shaped rewards and advantages: the experience the Trainer then learns from.

Sequences are laid out as [prompt, left-padded to P | response, right-padded to C], so
every response starts at column P. Per-token tensors have C columns: column j holds
quantities of response token j (its log-prob comes from the logits at column P + j - 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..logps import attention_implementation, final_hidden, head_logps, output_head, unwrap
from ..sampling import generate_completions
from ..shared_prefix import attention_inputs
from . import core
from .controllers import RunningMoments
from .policy_value import PolicyValueHead
from .rollout_metrics import length_metrics, metrics_to_host, score_metrics


@dataclass
class Batch:
    input_ids: Tensor        # [B, P + C]
    attention_mask: Tensor   # [B, P + C]
    position_ids: Tensor     # [B, P + C]
    response_mask: Tensor    # [B, C]: 1 up to and including eos
    prompt_width: int        # P


def build_batch(tokenizer, prompt_ids: list[list[int]], response_ids: list[list[int]],
                device) -> Batch:
    """Left-pad prompts, right-pad responses, positions counted over real tokens only."""
    pad = tokenizer.pad_token_id
    p_width = max(len(p) for p in prompt_ids)
    c_width = max(1, max(len(r) for r in response_ids))
    ids, attn, resp = [], [], []
    for p, r in zip(prompt_ids, response_ids):
        ids.append([pad] * (p_width - len(p)) + p + r + [pad] * (c_width - len(r)))
        attn.append([0] * (p_width - len(p)) + [1] * (len(p) + len(r)) + [0] * (c_width - len(r)))
        resp.append([1] * len(r) + [0] * (c_width - len(r)))
    attention = torch.tensor(attn, device=device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return Batch(torch.tensor(ids, device=device), attention, positions,
                 torch.tensor(resp, device=device, dtype=torch.float32), p_width)


def rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows start:stop of a batch (same prompt width)."""
    return Batch(batch.input_ids[start:stop], batch.attention_mask[start:stop],
                 batch.position_ids[start:stop], batch.response_mask[start:stop],
                 batch.prompt_width)


def response_logps(model, batch: Batch, temperature: float, with_entropy: bool = False,
                   group: int = 1, value_head=None):
    """log pi(response token) at the sampling temperature, with the LM head only at the
    positions that predict a real response token (``logps.head_logps``, in blocks): no
    [B, C, V] logits. With ``with_entropy`` also each position's entropy (with its
    gradient when autograd is on).
    Padding gets 0. -> [B, C] (or ([B, C], [B, C])).

    ``value_head`` (``policy_value.PolicyValueHead``): also the values of the states before
    each response token, from the same hidden states, appended: (logps, values) or
    (logps, entropy, values), values [B, C] with 0 on padding.

    ``group`` > 1: rows come in groups of that many samples of one prompt (consecutive,
    identical prompt columns), and each group runs as one row
    [prompt | response 1 | ... | response G] whose responses see the prompt and themselves
    only (``shared_prefix.attention_inputs``), every response positioned right after the
    prompt: the prompt is computed once per group instead of G times."""
    r, c = batch.response_mask.nonzero(as_tuple=True)  # real response tokens
    p = batch.prompt_width
    if group == 1:
        hidden = final_hidden(model, input_ids=batch.input_ids,
                              attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids)
        predictors, targets = hidden[r, p - 1 + c], batch.input_ids[r, p + c]
    else:
        packed = pack_groups(batch, group)
        hidden = final_hidden(model, input_ids=packed["input_ids"],
                              position_ids=packed["position_ids"],
                              **attention_inputs(attention_implementation(model),
                                                 packed["segment_ids"], unwrap(model).dtype))
        g, column = r // group, p + (r % group) * (batch.input_ids.shape[1] - p) + c
        predictors = hidden[g, torch.where(c == 0, p - 1, column - 1)]
        targets = packed["input_ids"][g, column]
    name = "entropy_grad" if torch.is_grad_enabled() else "entropy"
    out = head_logps(predictors, output_head(model), targets, temperature=temperature,
                     stats=(name,) if with_entropy else ())
    shape = batch.response_mask.shape

    def scatter(values: Tensor) -> Tensor:
        full = torch.zeros(shape, dtype=values.dtype, device=values.device)
        return full.index_put((r, c), values)

    result = (scatter(out[0]), scatter(out[1][name])) if with_entropy else (scatter(out),)
    if value_head is not None:
        result += (scatter(value_head.values(predictors)),)
    return result if len(result) > 1 else result[0]


def pack_groups(batch: Batch, group: int) -> dict[str, Tensor]:
    """Groups of ``group`` consecutive rows sharing a prompt, each packed into one row
    [prompt (P) | response 1 (C) | ... | response G (C)] with segment ids (0 prompt, k for
    response k, -1 padding) and positions (each response's restart after the prompt).
    Shapes: [B, P + C] rows -> [B / group, P + G C] each."""
    b, width = batch.input_ids.shape
    p, c, n = batch.prompt_width, width - batch.prompt_width, b // group
    if b % group:
        raise ValueError(f"{b} rows do not split into groups of {group}")
    ids = batch.input_ids.view(n, group, width)
    if not bool((ids[:, :, :p] == ids[:, :1, :p]).all()):
        raise ValueError("prefix sharing needs the samples of a group to share one prompt")
    positions = batch.position_ids.view(n, group, width)
    live = batch.response_mask.view(n, group, c).bool()
    segment = torch.arange(1, group + 1, device=ids.device).view(1, group, 1)
    prompt_live = batch.attention_mask.view(n, group, width)[:, 0, :p].bool()
    return {
        "input_ids": torch.cat([ids[:, 0, :p], ids[:, :, p:].reshape(n, group * c)], 1),
        "position_ids": torch.cat([positions[:, 0, :p],
                                   positions[:, :, p:].reshape(n, group * c)], 1),
        "segment_ids": torch.cat([torch.where(prompt_live, 0, -1),
                                  torch.where(live, segment, -1).reshape(n, group * c)], 1),
    }


def response_values(value_model, batch: Batch) -> Tensor:
    """V of the state before each response token. -> [B, C]."""
    out = value_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids)
    p = batch.prompt_width
    return out.values[:, p - 1:-1].float()


@dataclass
class Scored:
    """What the rollout's scoring forwards give, [B, C] each; None where not asked for."""

    old_logps: Tensor | None
    ref_logps: Tensor | None
    entropy: Tensor | None
    values: Tensor | None


def scoring_forwards(policy, reference: Callable[[Batch], Tensor] | None, value_model,
                     batch: Batch, temperature: float, chunk: int, group: int = 1) -> Scored:
    """The policy's log-probs and entropy, the reference's log-probs and the values (each
    skipped when its model is None), in chunks of ``chunk`` rows: one chunk's activations
    at a time, so peak memory follows ``chunk`` (local_rollout_forward_batch_size), not the
    rollout batch. With ``group`` > 1 (prefix sharing; ``chunk`` a multiple of it) the
    policy and ``reference`` run each group's prompt once. A value head on the policy
    (``PolicyValueHead``) takes its values from the policy's forward."""
    shared = isinstance(value_model, PolicyValueHead) and policy is not None
    parts = []
    for start in range(0, batch.input_ids.shape[0], chunk):
        sub = rows(batch, start, start + chunk)
        if shared:
            logps, entropy, values = response_logps(policy, sub, temperature, True, group,
                                                    value_head=value_model)
        else:
            logps, entropy = (response_logps(policy, sub, temperature, True, group)
                              if policy is not None else (None, None))
            values = response_values(value_model, sub) if value_model is not None else None
        ref = reference(sub) if reference is not None else None
        parts.append((logps, ref, entropy, values))
    cat = [torch.cat(column) if column[0] is not None else None for column in zip(*parts)]
    return Scored(*cat)


@dataclass
class RolloutResult:
    experience: dict[str, Tensor]   # tensors with B rows, ready for minibatches
    metrics: dict[str, float]
    prompts: list           # as given: strings or conversations
    completions: list[str]
    scores: list[float]


def render_prompt(tokenizer, prompt) -> str:
    """A prompt as the text the policy continues: a plain string as it is; a conversation
    (TRL's conversational format, a list of role/content messages) through the tokenizer's
    chat template with the generation prompt (the assistant turn's opening) appended."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def check_prompts_fit_model(model, tokenizer, prompts: list, response_length: int,
                            name: str = "train") -> int:
    """Before any sampling: every prompt, rendered and tokenized as the rollout does, has
    token ids inside the model's vocabulary and leaves room for ``response_length`` new
    tokens within its positions. Raises ``DataError`` naming the row. Returns the longest
    prompt's token count."""
    from ..data import DataError, check_in_vocabulary, model_limits

    vocab, positions = model_limits(model)
    texts = [render_prompt(tokenizer, p) for p in prompts]
    longest = 0
    for row, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        longest = max(longest, len(ids))
        where = f"{name} dataset, row {row}, column 'prompt'"
        check_in_vocabulary(ids, vocab, where)
        if positions is not None and len(ids) + response_length > positions:
            raise DataError(f"{where}: {len(ids)} tokens plus "
                            f"response_length={response_length} exceed the model's {positions} "
                            "positions. Shorten or drop the prompt, or lower response_length "
                            "(max_completion_length in GRPOConfig and RLOOConfig).")
    return longest


# (dataset rows, completions, completion_ids) -> (per-function scores [B, F], total [B])
ScoreFn = Callable[[list[dict], list[str], list[list[int]]], tuple[Tensor, Tensor]]


@dataclass
class Sampled:
    """Sampled and scored rows (groups of num_generations consecutive rows)."""

    rows: list[dict]          # dataset rows: "prompt" and the other columns
    texts: list[str]          # rendered prompts
    completions: list[str]
    ids: list[list[int]]
    finished: list[bool]
    sampler_logps: list[list[float]] | None  # vLLM's log-prob of each of ids (else None)
    per_func: Tensor          # [B, F] raw scores per reward function (NaN: not scored)
    total: Tensor             # [B] their weighted sum (NaN: no function scored the row)
    scores: Tensor            # [B] total after the eos penalty and clipping

    def take(self, index: list[int]) -> Sampled:
        pick = torch.tensor(index, dtype=torch.long)
        lists = [[getattr(self, k)[i] for i in index] if getattr(self, k) is not None
                 else None for k in _LISTS]
        return Sampled(*lists, *[getattr(self, k)[pick] for k in _TENSORS])


_LISTS = ("rows", "texts", "completions", "ids", "finished", "sampler_logps")
_TENSORS = ("per_func", "total", "scores")


def sample_and_score(policy, tokenizer, rows: list[dict], score: ScoreFn, args, seed: int,
                     engine=None, first_row: int = 0) -> Sampled:
    """Sample one response per row (with ``engine``, a ``vllm_engine`` one, else our
    sampler), score it with every reward function, apply the eos penalty and the clip.
    Row i draws from the random stream of key ``first_row + i``."""
    texts = [render_prompt(tokenizer, r["prompt"]) for r in rows]
    decoding = dict(max_new_tokens=args.response_length, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=seed,
                    row_keys=range(first_row, first_row + len(rows)))
    if engine is not None:
        sampled = engine.generate(texts, **decoding)
    else:
        sampled = generate_completions(policy, tokenizer, texts, **decoding,
                                       batch_size=args.local_rollout_forward_batch_size)
    per_func, total = score(rows, sampled.texts, sampled.ids)
    scores = core.penalize_missing_eos(total, torch.tensor(sampled.finished),
                                       args.missing_eos_penalty)
    scores = core.clip_scores(scores, args.score_bounds)
    return Sampled(list(rows), texts, sampled.texts, sampled.ids, list(sampled.finished),
                   sampled.logps if engine is not None else None, per_func, total, scores)


def dynamic_sampling(first: Sampled, sample: Callable[[int, int], Sampled], group: int,
                     max_rounds: int) -> tuple[Sampled, Tensor]:
    """DAPO's dynamic sampling: groups whose scores are all equal are replaced, in order,
    by the informative groups of further samples (``sample(n_groups, round)``), at most
    ``max_rounds`` times. Returns the rows and a [B] bool: False on rows of groups still
    uninformative (they take no loss)."""
    current = first
    for round_ in range(1, max_rounds + 1):
        bad = (~core.informative_groups(current.scores, group)).nonzero().flatten().tolist()
        if not bad:
            break
        extra = sample(len(bad), round_)
        good = core.informative_groups(extra.scores, group).nonzero().flatten().tolist()
        order = list(range(len(current.rows) // group))
        pool = [current.take(list(range(g * group, (g + 1) * group))) for g in order]
        for slot, g in zip(bad, good):
            pool[slot] = extra.take(list(range(g * group, (g + 1) * group)))
        current = _concat(pool)
    live = core.informative_groups(current.scores, group).repeat_interleave(group)
    return current, live


def _concat(parts: list[Sampled]) -> Sampled:
    lists = [[x for p in parts for x in getattr(p, k)] if getattr(parts[0], k) is not None
             else None for k in _LISTS]
    return Sampled(*lists,
                   *[torch.cat([getattr(p, k) for p in parts]) for k in _TENSORS])


@torch.no_grad()
def rollout(*, policy, reference: Callable[[Batch], Tensor], value_model, tokenizer,
            rows: list[dict], score: ScoreFn, args, kl_coef: float,
            moments: RunningMoments | None, seed: int,
            gather: Callable[[Tensor], Tensor] | None = None,
            more_rows: Callable[[int, int], list[dict]] | None = None,
            reward_names: tuple[str, ...] = (), engine=None,
            first_row: int = 0) -> RolloutResult:
    """One rollout: sample, score, compute the per-token KL penalty and the advantages
    (GAE with ``value_model``, else the critic-free ``args.advantage_estimator``; group
    estimators expect each prompt ``args.num_generations`` times in a row). ``reference``
    is None when no KL is asked for; the policy's scoring forward is skipped when the
    update is exactly on-policy (``args.needs_rollout_logps``).
    ``rows``: dataset rows ("prompt": a string or a conversation, plus the columns the
    reward functions read). ``gather`` (``accelerator.gather``) makes the score
    statistics and the logged metrics those of all processes' rollouts together.
    ``more_rows(n_groups, round)``: further rows for ``args.dynamic_sampling``.
    ``engine`` (``vllm_engine``): samples instead of the policy; with
    ``args.vllm_importance_sampling_correction`` the experience keeps its log-probs
    (``sampler_logps``) for the update's correction. ``first_row``: the position of
    ``rows[0]`` among every process's rows (process rank x rows per process): row i samples
    from the random stream of key ``first_row + i``, so two processes sample what one
    process given all their rows does."""
    device = next(policy.parameters()).device
    group = args.num_generations
    sampled = sample_and_score(policy, tokenizer, rows, score, args, seed, engine, first_row)
    live = torch.ones(len(rows), dtype=torch.bool)
    if args.dynamic_sampling:
        def sample(n_groups: int, round_: int) -> Sampled:
            return sample_and_score(policy, tokenizer, more_rows(n_groups, round_), score,
                                    args, seed + 7919 * round_, engine, first_row)
        sampled, live = dynamic_sampling(sampled, sample, group, args.dynamic_sampling_max_rounds)
    prompts = [r["prompt"] for r in sampled.rows]
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in sampled.texts]
    batch = build_batch(tokenizer, prompt_ids, sampled.ids, device)
    mask = batch.response_mask

    policy.eval()
    if value_model is not None:
        value_model.eval()
    scored = scoring_forwards(policy if args.needs_rollout_logps else None, reference,
                              value_model, batch, args.temperature,
                              args.local_rollout_forward_batch_size, args.shared_prompt_group)

    scores = sampled.scores.to(device)
    finished = torch.tensor(sampled.finished, device=device)
    every = gather or (lambda x: x)
    total = None if gather is None else (lambda t: gather(t[None]).sum(0))  # [k] summed
    if moments is not None:
        moments.update(every(scores))
        scores = moments.normalize(scores)

    has_kl = scored.old_logps is not None and scored.ref_logps is not None
    kl = (core.per_token_kl(scored.old_logps, scored.ref_logps, args.kl_estimator) * mask
          if has_kl else torch.zeros_like(mask))  # without it, kl_coef is 0
    if args.advantage_estimator == "gae":
        rewards = core.shape_rewards(scores, kl, mask, kl_coef)
        if args.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False, total=total)
        advantages, returns = core.gae(rewards, scored.values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask, total=total)
    else:
        all_scores = None
        if args.scale_rewards == "batch" or args.normalize_advantages:
            all_scores = every(scores - kl_coef * kl.sum(1) if args.kl_in_reward == "score"
                               else scores)
        advantages = core.critic_free_advantages(
            scores, kl, mask, kl_coef, args.advantage_estimator, group, args.gamma,
            args.scale_rewards, args.kl_in_reward, all_scores, total)
        if args.normalize_advantages:
            seq = advantages[:, 0]
            everyone = every(seq)
            advantages = core.whiten_scores(seq, everyone)[:, None] * mask

    local = {"objective/scores": torch.nanmean(sampled.total),
             "val/num_eos_tokens": finished.float().sum(),
             "response_length": mask.sum(1).float().mean()}
    if has_kl:  # means over every process's rollout (the KL controller reads objective/kl)
        non_score = (-kl_coef * kl).sum(1)
        if not args.kl_loss_coef:  # TRL's RLOO name: the token mean (a KL loss logs its own)
            local["kl"] = core.masked_mean(kl, mask)
        local.update({"objective/kl": kl.sum(1).mean(),
                      "objective/non_score_reward": non_score.mean(),
                      "objective/rlhf_reward": torch.nanmean(scores + non_score)})
    if scored.entropy is not None:
        local["objective/entropy"] = core.masked_mean(scored.entropy, mask)
    metrics = metrics_to_host(
        local, {**score_metrics(sampled.per_func, sampled.total, every, group, reward_names,
                                device),
                **length_metrics(every(mask.sum(1)), every(finished))}, gather, device)

    loss_mask = core.loss_mask(mask, live.to(device), finished,
                               args.mask_truncated_completions)
    experience = {
        "input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids, "response_mask": mask, "loss_mask": loss_mask,
        "advantages": advantages,
        "prompt_width": torch.full((len(prompts),), batch.prompt_width, device=device),
    }
    if args.loss_aggregation == "step_token_mean":  # tokens per micro-batch, every process
        world = 1 if gather is None else every(torch.ones(1, device=device)).numel()
        tokens = every(loss_mask.sum().reshape(1)).sum() / world / args.steps_per_rollout
        experience["step_tokens"] = tokens.expand(len(prompts)).clone()
    if engine is not None and args.vllm_importance_sampling_correction:
        sampler = torch.zeros_like(mask)  # for the correction the update computes
        for i, row in enumerate(sampled.sampler_logps):
            sampler[i, :len(row)] = torch.tensor(row, dtype=mask.dtype)
        experience["sampler_logps"] = sampler
    for key in ("old_logps", "ref_logps"):
        if getattr(scored, key) is not None:
            experience[key] = getattr(scored, key)
    if args.advantage_estimator == "gae":
        experience.update(old_values=scored.values, returns=returns)
    return RolloutResult(experience, metrics, prompts, sampled.completions,
                         sampled.total.tolist())
