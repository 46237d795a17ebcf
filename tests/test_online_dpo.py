"""Online (iterative) DPO from a judge on the tiny world: two rounds end to end, the labels
by hand, the reference held at the initial policy, and resume after a lost round."""

import json
import math
import shutil

import pytest
import torch
from conftest import MULTIPROCESS, run_recipe
from online_dpo_driver import CountingJudge as OracleJudge  # the oracle, counting
from transformers import AutoModelForCausalLM, TrainerCallback

from rlhf_ext.judges import FunctionJudge
from rlhf_ext.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
from rlhf_ext.worlds.tiny import oracle_score, prompt_dataset

PROMPTS = prompt_dataset(8, seed=3, split="online")


class Rounds(TrainerCallback):
    """Counts the Trainer runs it sees begin (one per round trained)."""

    def __init__(self):
        self.begun = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.begun += 1


def run(model_dir, tok, out, lora: bool, resume: bool = False):
    from peft import LoraConfig

    args = OnlineDPOConfig(
        output_dir=str(out), num_rounds=2, num_generations=3, max_new_tokens=16,
        per_device_train_batch_size=6, num_train_epochs=1, learning_rate=5e-3 if lora else 5e-4,
        beta=0.1, max_length=64, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0)
    judge = OracleJudge()
    trainer = OnlineDPOTrainer(AutoModelForCausalLM.from_pretrained(model_dir), judge, args,
                               train_dataset=PROMPTS, processing_class=tok, callbacks=[Rounds()],
                               peft_config=LoraConfig(r=8, target_modules="all-linear")
                               if lora else None)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, judge


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("lora", [False, True])
def test_online_dpo_rounds_labels_and_resume(sft_run, tok, tmp_path, lora):
    model_dir = sft_run[0]
    initial = weights(AutoModelForCausalLM.from_pretrained(model_dir))
    trainer, judge = run(model_dir, tok, tmp_path / "run", lora)
    assert judge.judged == 2 * 8 * 3  # two rounds, 8 prompts, C(3, 2) pairs each
    assert trainer.callbacks[0].begun == 2  # the user's callback sees every round's run

    rounds = json.loads((tmp_path / "run" / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1] and all(r["pairs"] == 24 for r in rounds)
    assert all(math.isfinite(r["train_loss"]) for r in rounds)
    for r in (0, 1):
        folder = tmp_path / "run" / f"round-{r}"
        labels = [json.loads(line) for line in (folder / "labels.jsonl").read_text().splitlines()]
        samples = json.loads((folder / "samples.json").read_text())
        assert len(samples) == 8 and all(len(s) == 3 for s in samples)
        for row in labels:  # the soft label by hand from the oracle's scores
            gap = oracle_score(row["chosen"]) - oracle_score(row["rejected"])
            assert row["chosen_probability"] == pytest.approx(1 / (1 + math.exp(-4.0 * gap)))
        assert rounds[r]["judge/chosen_probability"] == pytest.approx(
            sum(row["chosen_probability"] for row in labels) / 24)
    s0, s1 = (json.loads((tmp_path / "run" / f"round-{r}" / "samples.json").read_text())
              for r in (0, 1))
    assert s0 != s1  # round 1 sampled the updated policy

    policy = trainer.trainer.accelerator.unwrap_model(trainer.trainer.model)
    final = weights(policy.merge_and_unload() if lora else policy)
    assert any(not torch.equal(final[k], initial[k]) for k in initial)
    if not lora:  # the reference is still the initial policy after two rounds
        ref = weights(trainer.trainer.ref_model)
        assert all(torch.equal(ref[k], initial[k]) for k in initial)

    # lose round 1's end (its model and summary), keep its samples and labels: a resumed
    # run loads round 0's weights, judges nothing again and trains round 1 to the same end
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    for name in ("round.json", "model.safetensors", "adapter_model.safetensors"):
        (tmp_path / "again" / "round-1" / name).unlink(missing_ok=True)
    again, judge = run(model_dir, tok, tmp_path / "again", lora, resume=True)
    assert judge.judged == 0 and again.callbacks[0].begun == 1  # round 1 only
    policy = again.trainer.accelerator.unwrap_model(again.trainer.model)
    resumed = weights(policy.merge_and_unload() if lora else policy)
    for k in final:
        torch.testing.assert_close(resumed[k], final[k], rtol=1e-5, atol=1e-6)


def test_an_empty_sample_is_trained_on_where_a_given_one_is_refused(policy_dir, tok, tmp_path):
    """A sample that is eos at once (text "") is a sample online DPO learns from: its
    completion is the eos token alone; the same row in a given dataset is a data error."""
    from datasets import Dataset

    from rlhf_ext.data import DataError
    from rlhf_ext.preference import PreferenceConfig, PreferenceTrainer

    data = Dataset.from_list([{"prompt": PROMPTS[0]["prompt"], "chosen": "a fine day .",
                               "rejected": ""}] * 2)
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, beta=0.1,
              max_length=64, report_to="none", use_cpu=True, save_strategy="no",
              disable_tqdm=True, learning_rate=1e-3)
    with pytest.raises(DataError, match="row 0, column 'rejected': empty text"):
        PreferenceTrainer(AutoModelForCausalLM.from_pretrained(policy_dir), None,
                          PreferenceConfig(**kw), train_dataset=data, processing_class=tok)
    trainer = PreferenceTrainer(AutoModelForCausalLM.from_pretrained(policy_dir), None,
                                OnlineDPOConfig(**kw), train_dataset=data, processing_class=tok)
    assert trainer.train_dataset[0]["rejected_ids"] == [tok.eos_token_id]
    # one step from policy == reference: the DPO loss is exactly log 2
    assert math.isclose(trainer.train().training_loss, math.log(2), rel_tol=1e-5)


def one_round(model_dir, tok, out, judge, resume=False):
    args = OnlineDPOConfig(
        output_dir=str(out), num_rounds=1, num_generations=3, max_new_tokens=12,
        per_device_train_batch_size=6, max_steps=1, beta=0.1, max_length=64, report_to="none",
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = OnlineDPOTrainer(AutoModelForCausalLM.from_pretrained(model_dir), judge, args,
                               train_dataset=PROMPTS.select(range(4)), processing_class=tok)
    trainer.train(resume_from_checkpoint=resume)
    return [json.loads(line) for line in
            (out / "round-0" / "labels.jsonl").read_text().splitlines()]


def test_a_fresh_start_in_a_used_folder_judges_anew(policy_dir, tok, tmp_path):
    """Started afresh (no resume) where an earlier run wrote its samples and labels, with
    another judge: the new judge's labels are made, not the old ones reused."""
    first = one_round(policy_dir, tok, tmp_path, OracleJudge())
    reversed_oracle = FunctionJudge(lambda p, texts: [-oracle_score(t) for t in texts], 4.0)
    with pytest.warns(UserWarning, match=r"not resuming: removing .*samples.json.*labels.jsonl"):
        second = one_round(policy_dir, tok, tmp_path, reversed_oracle)
    assert len(first) == len(second) == 4 * 3
    decided = [(old, new) for old, new in zip(first, second) if old["chosen_probability"] > 0.5]
    assert decided  # the oracle preferred one response in some pairs (ties stay as they are)
    for old, new in decided:  # there the reversed judge picks the other one
        assert (new["chosen"], new["rejected"]) == (old["rejected"], old["chosen"])


def test_files_cut_short_by_a_kill_are_handled_on_resume(policy_dir, tok, tmp_path):
    """A kill while appending labels leaves a cut last line: resume drops it and judges
    that comparison again. samples.json is written whole or not at all; one damaged by
    hand is refused naming the file."""
    judge = OracleJudge()
    full = one_round(policy_dir, tok, tmp_path, judge)
    labels = tmp_path / "round-0" / "labels.jsonl"
    (tmp_path / "round-0" / "round.json").unlink()  # the round did not finish
    text = labels.read_text()
    labels.write_text(text[:len(text) - 40])  # the last line cut mid-way
    judge.judged = 0
    with pytest.warns(UserWarning, match="its last line was cut short"):
        again = one_round(policy_dir, tok, tmp_path, judge, resume=True)
    assert judge.judged == 1 and again == full
    assert not list((tmp_path / "round-0").glob("*.tmp"))
    (tmp_path / "round-0" / "round.json").unlink()
    samples = tmp_path / "round-0" / "samples.json"
    samples.write_text(samples.read_text()[:-10])
    with pytest.raises(ValueError, match=r"samples.json is not valid JSON.*delete it"):
        one_round(policy_dir, tok, tmp_path, judge, resume=True)


@pytest.fixture(scope="session")
def online_dpo_single(policy_dir, tmp_path_factory):
    """The driver's two rounds on one process (one thread, as each launched process)."""
    import online_dpo_driver

    out = tmp_path_factory.mktemp("online-dpo-1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        online_dpo_driver.main(str(policy_dir), out)
    finally:
        torch.set_num_threads(threads)
    return out


@MULTIPROCESS
@pytest.mark.parametrize("config, wrapper", [("ddp", "DistributedDataParallel"),
                                             ("fsdp", "FSDPLlamaForCausalLM"),
                                             ("zero3", "DeepSpeedEngine")])
def test_two_processes_share_the_sampling_and_the_judging(policy_dir, online_dpo_single,
                                                          tmp_path, config, wrapper):
    """Launched on two processes, each samples and judges half of each round's prompts
    (its own files: prompts 0, 2, ... and 1, 3, ...), both train on all the pairs, and the
    run is the one-process run: the same samples (each prompt's random streams keyed by
    its place in the round), the pairs in the same order, the same losses and weights.
    Under FSDP2 and ZeRO-3 each round's Trainer shards a copy of the policy, and both
    processes sample the next round from the whole weights it saved."""
    run_recipe(["--config_file", f"accelerate_configs/{config}.yaml", "--num_processes", "2",
                "tests/online_dpo_driver.py", str(policy_dir), str(tmp_path)],
               launcher="accelerate_config", timeout=240)
    report = json.loads((tmp_path / "driver.json").read_text())
    single = json.loads((online_dpo_single / "driver.json").read_text())
    assert report["world_size"] == 2 and report["wrapper"] == wrapper
    # 8 prompts x 3 samples, every two judged: 4 prompts x 3 pairs per process per round
    assert report["judged"] == [24, 24] and single["judged"] == [48]
    assert [r["pairs"] for r in report["rounds"]] == [24, 24]
    assert report["replica_drift"] == 0.0  # the policy that samples, the same on both
    losses = [r["train_loss"] for r in report["rounds"]]
    assert losses == pytest.approx([r["train_loss"] for r in single["rounds"]], rel=1e-4)
    for r in range(2):
        folder = tmp_path / f"round-{r}"
        shares = [json.loads((folder / f"samples-{i}.json").read_text()) for i in range(2)]
        assert [len(s) for s in shares] == [4, 4] and not (folder / "samples.json").exists()
        alone = json.loads((online_dpo_single / f"round-{r}" / "samples.json").read_text())
        assert [g for pair in zip(*shares) for g in pair] == alone
        assert (folder / "round.json").exists()
    trained, want, base = (AutoModelForCausalLM.from_pretrained(folder).state_dict() for folder
                           in (tmp_path / "round-1", online_dpo_single / "round-1", policy_dir))
    assert trained.keys() == want.keys()
    assert any(not torch.equal(want[k], base[k]) for k in want)
    for name in want:
        torch.testing.assert_close(trained[name], want[name], rtol=1e-5, atol=1e-7)
