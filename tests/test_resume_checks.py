"""Resuming with something other than what the checkpoint was trained with is refused,
naming what differs (rlhf_ext.run_record), unless resume_allow_changes says to go on; a
checkpoint without its optimizer state likewise (found in each layout the Trainer saves:
one process, FSDP, DeepSpeed); and extending max_steps continues the
learning-rate schedule where a longer run would be."""

import pytest
from transformers import AutoTokenizer, TrainerCallback

from rlhf_ext.preference import PreferenceConfig, PreferenceTrainer
from rlhf_ext.run_record import RECORD
from rlhf_ext.worlds.tiny import build_model, preference_pairs

PAIRS = preference_pairs(32, seed=4)


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                save_strategy="steps", save_steps=2, learning_rate=1e-3, report_to="none",
                use_cpu=True, disable_tqdm=True, seed=0, max_length=64)
    return PreferenceConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(policy_dir, tok, tmp_path_factory):
    """A finished 4-step DPO run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("resume") / "run"
    PreferenceTrainer(str(policy_dir), args=args(out), train_dataset=PAIRS,
                      processing_class=tok).train()
    return out


def resume(model, tok, out, data=PAIRS, **kw):
    trainer = PreferenceTrainer(str(model), args=args(out, max_steps=6, **kw),
                                train_dataset=data, processing_class=tok)
    return trainer, (lambda: trainer.train(resume_from_checkpoint=True))


def saved_model(tmp_path, tok, size="tiny", seed=1, template=None):
    path = tmp_path / f"{size}-{seed}"
    build_model(size, tok, seed=seed).save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(path)
    return path, tok


def test_the_checkpoint_records_what_it_was_trained_with(trained):
    import json

    record = json.loads((trained / "checkpoint-2" / RECORD).read_text())
    assert record["settings"]["loss_type"] == ["sigmoid"]
    assert record["settings"]["beta"] is None  # as configured: the loss's own (0.1)
    assert record["model"]["hidden_size"] == 32 and record["model"]["name"].endswith("tiny")
    assert record["tokenizer"] and record["data"]


@pytest.mark.parametrize("change, match", [
    ("loss", r"settings loss_type: \['sigmoid'\] -> \['ipo'\]"),
    ("beta", r"settings beta: None -> 0.5"),
    ("model", r"model name: '.*tiny' -> '.*tiny-1'"),
    ("architecture", r"model hidden_size: 32 -> 64"),
    ("template", r"tokenizer or chat template: another one"),
    ("data", r"training data: another one"),
])
def test_a_resume_that_differs_is_refused_naming_the_difference(
        trained, policy_dir, tok, tmp_path, change, match):
    model, tokenizer, data, kw = policy_dir, tok, PAIRS, {}
    if change == "loss":
        kw = dict(loss_type="ipo")
    elif change == "beta":
        kw = dict(beta=0.5)
    elif change == "model":
        model, tokenizer = saved_model(tmp_path, tok)
    elif change == "architecture":
        model, tokenizer = saved_model(tmp_path, tok, size="small")
    elif change == "template":
        model, tokenizer = policy_dir, saved_model(tmp_path, tok, template="{{ messages }}")[1]
    else:
        data = preference_pairs(32, seed=5)
    _, go = resume(model, tokenizer, trained, data, **kw)
    with pytest.raises(ValueError, match=rf"resuming .*checkpoint-4, which was trained "
                                         rf"otherwise: .*{match}.*resume_allow_changes=True"):
        go()


def test_resume_allow_changes_goes_on_with_a_warning(trained, policy_dir, tok, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    trainer, go = resume(policy_dir, tok, out, beta=0.5, resume_allow_changes=True)
    with pytest.warns(UserWarning, match=r"resuming .*checkpoint-4 although it differs: "
                                         r"settings beta: None -> 0.5"):
        go()
    assert trainer.state.global_step == 6


def test_a_checkpoint_without_optimizer_state_is_refused(trained, policy_dir, tok, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "checkpoint-4" / "optimizer.pt").unlink()
    _, go = resume(policy_dir, tok, out)
    with pytest.raises(ValueError, match=r"optimizer state: missing \(saved with "
                                         r"save_only_model\?\)"):
        go()


@pytest.mark.parametrize("layout, found", [
    ({"optimizer.pt": "file"}, True),            # one process, DDP
    ({"optimizer.bin": "file"}, True),           # FSDP, full state dict
    ({"optimizer_0": "dir"}, True),              # FSDP, sharded state dict
    ({"global_step4": "dir"}, True),             # DeepSpeed
    ({"model.safetensors": "file", "scheduler.pt": "file"}, False),  # save_only_model
    ({"optimizer_notes.txt": "file"}, False),    # a file is not a sharded state
])
def test_optimizer_state_is_found_in_each_layout_the_trainer_loads(tmp_path, layout, found):
    from rlhf_ext.run_record import has_optimizer_state

    for name, kind in layout.items():
        (tmp_path / name).mkdir() if kind == "dir" else (tmp_path / name).write_text("x")
    assert has_optimizer_state(str(tmp_path)) is found


class UsedRates(TrainerCallback):
    """The learning rate each optimizer step runs with, read just before it."""

    def __init__(self):
        self.rates = {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.rates[state.global_step + 1] = optimizer.param_groups[0]["lr"]


def test_extending_max_steps_continues_the_schedule(trained, policy_dir, tok, tmp_path):
    """A finished 4-step run resumed with max_steps=8: step 5 used to run at the 4-step
    schedule's final rate 0, then jump to 3.75e-4. Now steps 5-8 run at the rates an 8-step
    linear schedule gives there: 5e-4, 3.75e-4, 2.5e-4, 1.25e-4."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    used = UsedRates()
    trainer = PreferenceTrainer(str(policy_dir), args=args(out, max_steps=8),
                                train_dataset=PAIRS, processing_class=tok, callbacks=[used])
    trainer.train(resume_from_checkpoint=True)
    assert sorted(used.rates) == [5, 6, 7, 8]
    for step, rate in used.rates.items():
        assert rate == pytest.approx(1e-3 * (8 - (step - 1)) / 8, rel=1e-9), step
