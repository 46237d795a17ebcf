"""Parity with TRL's trainers: same tiny models, data and settings, learning rate 0, one step.

The policy and the reference are two different random models, so every log-ratio is
non-zero and the comparison means something.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_ext.losses import LOSSES
from rlhf_ext.preference import PreferenceConfig, PreferenceTrainer
from rlhf_ext.worlds.tiny import build_model, preference_pairs, unpaired_dataset

BETA = 0.3
COMMON = dict(learning_rate=0.0, max_steps=1, per_device_train_batch_size=8, logging_steps=1,
              report_to="none", use_cpu=True, bf16=False, save_strategy="no",
              disable_tqdm=True, gradient_checkpointing=False, seed=0, max_length=128)


@pytest.fixture(scope="module")
def models(world_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    tok = AutoTokenizer.from_pretrained(world_dir / "base")
    for name, seed in (("policy", 0), ("ref", 1)):
        build_model("tiny", tok, seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "policy", root / "ref", tok


def ours(models, data, **kwargs):
    policy, ref, tok = models
    args = PreferenceConfig(output_dir="/tmp/rlhf_ext_parity", **COMMON, **kwargs)
    needs_ref = any(LOSSES[n if n != "dpo" else "sigmoid"].needs_reference
                    for n in args.loss_type)
    trainer = PreferenceTrainer(str(policy), ref_model=str(ref) if needs_ref else None,
                                args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    return trainer.state.log_history[0]


def trl_log(trainer):
    trainer.train()
    return trainer.state.log_history[0]


def close(a, b, rel=1e-5):
    """Equal up to float32 summation order: we run the LM head at completion positions only,
    so the matmuls differ in shape from TRL's. A margin is a difference of two log-ratios of
    sums of ~50 log-probs each, so its error is absolute (about 1e-6), not relative."""
    return a == pytest.approx(b, rel=rel, abs=1e-5)


DPO_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
             "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
             "sigmoid_norm"]


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_family_matches_trl(models, loss_type):
    from trl import DPOConfig, DPOTrainer

    policy, ref, tok = models
    data = preference_pairs(8, seed=3)
    smoothing = 1e-3 if loss_type == "exo_pair" else 0.0
    theirs = trl_log(DPOTrainer(
        str(policy), ref_model=AutoModelForCausalLM.from_pretrained(ref), processing_class=tok, train_dataset=data,
        args=DPOConfig(output_dir="/tmp/rlhf_ext_parity_trl", loss_type=[loss_type], beta=BETA,
                       label_smoothing=smoothing, **COMMON)))
    mine = ours(models, data, loss_type=loss_type, beta=BETA, label_smoothing=smoothing)
    assert close(mine["loss"], theirs["loss"]), (mine["loss"], theirs["loss"])
    assert close(mine["logps/chosen"], theirs["logps/chosen"])
    if loss_type == "sft":
        # Differs on purpose: sft needs no reference, so we run none and its rewards are
        # beta * policy log-probs; TRL runs the reference anyway and logs log-ratios.
        assert close(mine["rewards/margins"], BETA * (mine["logps/chosen"] - mine["logps/rejected"]))
    else:
        assert close(mine["rewards/margins"], theirs["rewards/margins"])


def test_rpo_composition_matches_trl(models):
    from trl import DPOConfig, DPOTrainer

    policy, ref, tok = models
    data = preference_pairs(8, seed=4)
    kw = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], beta=BETA)
    theirs = trl_log(DPOTrainer(str(policy), ref_model=AutoModelForCausalLM.from_pretrained(ref), processing_class=tok,
                                train_dataset=data,
                                args=DPOConfig(output_dir="/tmp/rlhf_ext_parity_trl", **kw,
                                               **COMMON)))
    mine = ours(models, data, **kw)
    assert close(mine["loss"], theirs["loss"])
    assert close(mine["rewards/margins"], theirs["rewards/margins"])


def test_kto_matches_trl(models):
    from trl import KTOConfig, KTOTrainer

    policy, ref, tok = models
    data = unpaired_dataset(8, seed=2)
    assert 0 < sum(data["label"]) < 8  # both kinds in the one batch
    kw = dict(beta=BETA, desirable_weight=1.2, undesirable_weight=0.9)
    theirs = trl_log(KTOTrainer(
        str(policy), ref_model=AutoModelForCausalLM.from_pretrained(ref), processing_class=tok, train_dataset=data,
        args=KTOConfig(output_dir="/tmp/rlhf_ext_parity_trl", loss_type="kto",
                       train_sampling_strategy="sequential", **kw, **COMMON)))
    mine = ours(models, data, loss_type="kto", **kw)
    for key in ("loss", "rewards/margins", "kl", "logps/chosen", "logps/rejected"):
        assert close(mine[key], theirs[key]), (key, mine[key], theirs[key])


def test_simpo_matches_trl_cpo(models):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy, ref, tok = models
    data = preference_pairs(8, seed=5)
    theirs = trl_log(CPOTrainer(
        str(policy), processing_class=tok, train_dataset=data,
        args=CPOConfig(output_dir="/tmp/rlhf_ext_parity_trl", loss_type="simpo", beta=2.0,
                       simpo_gamma=1.0, cpo_alpha=0.0, **COMMON)))
    mine = ours(models, data, loss_type="simpo", beta=2.0, simpo_gamma=1.0)
    assert close(mine["loss"], theirs["loss"]), (mine["loss"], theirs["loss"])
    assert close(mine["rewards/margins"], theirs["rewards/margins"])


def test_orpo_matches_trl_where_defined_alike(models):
    """TRL's ORPOTrainer takes the NLL over prompt and completion; ours (the paper's) over
    the completion only. The odds-ratio term and the margins must match TRL; our loss must
    equal our NLL - lambda * log_odds_ratio with the NLL computed here by hand."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy, ref, tok = models
    data = preference_pairs(8, seed=6)
    theirs = trl_log(ORPOTrainer(
        str(policy), processing_class=tok, train_dataset=data,
        args=ORPOConfig(output_dir="/tmp/rlhf_ext_parity_trl", beta=BETA, **COMMON)))
    mine = ours(models, data, loss_type="orpo", beta=BETA)
    assert close(mine["log_odds_ratio"], theirs["log_odds_ratio"])
    assert close(mine["rewards/margins"], theirs["rewards/margins"])
    assert close(mine["loss"], mine["nll_loss"] - BETA * mine["log_odds_ratio"])

    model = AutoModelForCausalLM.from_pretrained(policy)
    nll_sum, n_tokens = 0.0, 0
    for prompt, chosen in zip(data["prompt"], data["chosen"]):
        p = tok(prompt)["input_ids"]
        full = tok(prompt + chosen + tok.eos_token)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
        for t in range(len(p), len(full)):
            nll_sum -= logp[t - 1, full[t]].item()
            n_tokens += 1
    assert close(mine["nll_loss"], nll_sum / n_tokens)


# ---------------------------------------------------------------------------------------
# TRL's DPO variants by config field, its per-token metrics, and the TRL-named presets
# ---------------------------------------------------------------------------------------

def dpo_pair(models, data, trl_kw=None, **kw):
    """(ours, TRL's) first log of DPOTrainer with the same fields (``trl_kw`` for TRL's if
    they differ), ours imported by TRL's name."""
    from trl import DPOConfig, DPOTrainer

    import rlhf_ext

    policy, ref, tok = models
    theirs = trl_log(DPOTrainer(
        str(policy), ref_model=AutoModelForCausalLM.from_pretrained(ref), processing_class=tok,
        train_dataset=data, args=DPOConfig(output_dir="/tmp/rlhf_ext_parity_trl",
                                           **(trl_kw or kw), **COMMON)))
    mine = rlhf_ext.DPOTrainer(str(policy), ref_model=str(ref), processing_class=tok,
                               train_dataset=data, args=rlhf_ext.DPOConfig(
                                   output_dir="/tmp/rlhf_ext_parity", **kw, **COMMON))
    mine.train()
    return mine.state.log_history[0], theirs


@pytest.mark.parametrize("fields", [
    dict(f_divergence_type="forward_kl"),
    dict(f_divergence_type="js_divergence", loss_type=["sigmoid_norm"]),
    dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3, loss_type=["ipo"]),
    dict(ld_alpha=0.5),
    dict(use_weighting=True),  # (TRL 1.16 fails on WPO with sft: an in-place op on a view)
], ids=["f-dpo-forward", "f-dpo-js", "f-dpo-alpha-ipo", "ld-dpo", "wpo"])
def test_dpo_variant_fields_match_trl(models, fields):
    data = preference_pairs(8, seed=7)
    mine, theirs = dpo_pair(models, data, beta=BETA, **fields)
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert close(mine[key], theirs[key]), (key, mine[key], theirs[key])


def test_per_token_metrics_match_trl(models, sft_run):
    """entropy, logits/chosen, logits/rejected, mean_token_accuracy and num_tokens, which
    TRL computes from full logits and we from the completion-only head's blocks. The policy
    is the tiny SFT model (the session's fixture), so the accuracy is neither 0 nor 1."""
    _, ref, tok = models
    mine, theirs = dpo_pair((sft_run[0], ref, tok), preference_pairs(8, seed=8), beta=BETA)
    for key in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy",
                "num_tokens"):
        assert close(mine[key], theirs[key]), (key, mine[key], theirs[key])
    assert 0 < mine["mean_token_accuracy"] < 1 and mine["entropy"] > 0


def test_rpo_alpha_is_the_sft_term(models):
    """TRL's old rpo_alpha (gone from TRL 1.16) is loss_type [sigmoid, sft] weighted."""
    data = preference_pairs(8, seed=9)
    mine, theirs = dpo_pair(models, data, beta=BETA, rpo_alpha=0.4, trl_kw=dict(
        beta=BETA, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.4]))
    assert close(mine["loss"], theirs["loss"]) and mine["nll_loss"] > 0


def test_tr_dpo_reference_sync_matches_trl(models):
    """TR-DPO: with lr > 0 and a sync after every step, the step-3 loss depends on the
    reference having moved twice; TRL's SyncRefModelCallback does the same mix."""
    data = preference_pairs(24, seed=10)
    kw = dict(beta=BETA, sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=1)
    common = {**COMMON, "max_steps": 3, "learning_rate": 1e-3}
    from trl import DPOConfig, DPOTrainer

    import rlhf_ext

    policy, ref, tok = models
    theirs = DPOTrainer(str(policy), ref_model=AutoModelForCausalLM.from_pretrained(ref),
                        processing_class=tok, train_dataset=data,
                        args=DPOConfig(output_dir="/tmp/rlhf_ext_parity_trl", **kw, **common))
    theirs.train()
    mine = rlhf_ext.DPOTrainer(str(policy), ref_model=str(ref), processing_class=tok,
                               train_dataset=data, args=rlhf_ext.DPOConfig(
                                   output_dir="/tmp/rlhf_ext_parity", **kw, **common))
    mine.train()
    plain = rlhf_ext.DPOTrainer(str(policy), ref_model=str(ref), processing_class=tok,
                                train_dataset=data, args=rlhf_ext.DPOConfig(
                                    output_dir="/tmp/rlhf_ext_parity", beta=BETA, **common))
    plain.train()
    ours_log, trl_logs = mine.state.log_history, theirs.state.log_history
    for step in range(3):
        assert ours_log[step]["loss"] == pytest.approx(trl_logs[step]["loss"], rel=1e-4)
    assert ours_log[2]["loss"] != pytest.approx(plain.state.log_history[2]["loss"], rel=1e-3)


def test_kto_apo_zero_unpaired_matches_trl(models):
    from trl import KTOConfig, KTOTrainer

    import rlhf_ext

    policy, ref, tok = models
    data = unpaired_dataset(8, seed=2)
    kw = dict(beta=BETA, loss_type="apo_zero_unpaired", train_sampling_strategy="sequential")
    theirs = trl_log(KTOTrainer(
        str(policy), ref_model=AutoModelForCausalLM.from_pretrained(ref), processing_class=tok,
        train_dataset=data, args=KTOConfig(output_dir="/tmp/rlhf_ext_parity_trl", **kw, **COMMON)))
    mine = rlhf_ext.KTOTrainer(str(policy), ref_model=str(ref), processing_class=tok,
                               train_dataset=data, args=rlhf_ext.KTOConfig(
                                   output_dir="/tmp/rlhf_ext_parity", **kw, **COMMON))
    mine.train()
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert close(mine.state.log_history[0][key], theirs[key]), key


@pytest.mark.parametrize("loss_type,cpo_alpha", [("sigmoid", 1.0), ("simpo", 0.5)])
def test_cpo_config_names_match_trl_cpo(models, loss_type, cpo_alpha):
    """TRL CPO's sigmoid is CPO (with its NLL term), and simpo with cpo_alpha > 0 is
    CPO-SimPO: both by TRL's names and defaults (beta 0.1, simpo_gamma 0.5)."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    import rlhf_ext

    policy, _, tok = models
    data = preference_pairs(8, seed=11)
    kw = dict(loss_type=loss_type, cpo_alpha=cpo_alpha)
    theirs = trl_log(CPOTrainer(str(policy), processing_class=tok, train_dataset=data,
                                args=CPOConfig(output_dir="/tmp/rlhf_ext_parity_trl", **kw,
                                               **COMMON)))
    mine = rlhf_ext.CPOTrainer(str(policy), processing_class=tok, train_dataset=data,
                               args=rlhf_ext.CPOConfig(output_dir="/tmp/rlhf_ext_parity", **kw,
                                                       **COMMON))
    mine.train()
    for key in ("loss", "rewards/margins", "nll_loss"):
        assert close(mine.state.log_history[0][key], theirs[key]), \
            (key, mine.state.log_history[0][key], theirs[key])
