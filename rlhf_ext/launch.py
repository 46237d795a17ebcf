"""What every recipe shares: machine-dependent defaults and the tiny-world arguments."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from trl import DatasetMixtureConfig


def machine_args() -> list[str]:
    """Command-line defaults a machine without a GPU needs (prepended, so explicit flags win).

    On CPU: ``use_cpu`` (else TRL's bf16 default fails), and the gloo backend when several
    processes run (else accelerate sees a world of one: ../shared/NOTES.md).
    """
    if torch.cuda.is_available():
        return []
    args = ["--use_cpu", "true"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args += ["--ddp_backend", "gloo"]
    return args


def run_main(main, arguments: tuple) -> None:
    """A recipe's ``__main__``: parse the YAML and command line into ``arguments``, run
    ``main``, then leave. In a multi-process launch, once ``main`` has returned (files
    saved, process group ended by ``finish_run``) the process exits at once with status
    0: interpreter teardown, where native threads of gloo and DeepSpeed are torn down in
    no set order, sometimes aborted a finished run (SIGABRT, "terminate called without
    an active exception") and the launch reported a failure. An exception in ``main``
    still exits non-zero as usual; a run stopped by SIGTERM exits with status 143 after
    its checkpoint (``rlhf_ext.preemption``)."""
    from trl import TrlParser

    from .preemption import EXIT_CODE, Preempted

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        main(*TrlParser(arguments).parse_args_and_config(args=with_machine_args()))
    except Preempted:  # checkpoint saved and reported: leave with SIGTERM's status, at once
        if not several:
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CODE)
    if several:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def with_machine_args(argv: list[str] | None = None) -> list[str]:
    """``argv`` (default ``sys.argv[1:]``) with ``machine_args`` in front."""
    return machine_args() + list(sys.argv[1:] if argv is None else argv)


@dataclass
class RecipeArguments(DatasetMixtureConfig):
    """What recipes add to TRL's arguments: a dataset mixture (TRL's ``datasets:`` list,
    each with path, split, columns, fraction, and ``test_split_size``) as an alternative to
    dataset_name, a held-out dataset, and the tiny world (built before training in seconds,
    cached; its oracle judges the result)."""

    eval_dataset_name: str | None = field(default=None, metadata={
        "help": "A separate held-out dataset (path or Hub id) for evaluation."})
    tiny_world_dir: str | None = field(
        default=None, metadata={"help": "Build/reuse the tiny world here before training."})
    tiny_world_seed: int = field(default=0, metadata={"help": "Seed of the tiny world."})
    tiny_model_size: str = field(default="small", metadata={"help": "tiny, small or base."})
    tiny_eval_prompts: int = field(
        default=256, metadata={"help": "After training, sample this many held-out prompts and "
                               "report oracle score and well-formedness (0 to skip)."})

    def load_datasets(self, script_args, training_args):
        """(train, eval): eval from eval_dataset_name, else the dataset's test split. The
        data is dataset_name, or the mixture of ``datasets`` (TRL's ``get_dataset``)."""
        from .data import load_dataset_any, train_eval_split

        if self.datasets and script_args.dataset_name:
            raise ValueError("give dataset_name or a datasets: mixture, not both")
        if self.datasets:
            from trl import get_dataset

            data = get_dataset(self)
        elif script_args.dataset_name:
            data = load_dataset_any(script_args.dataset_name, script_args.dataset_config)
        else:
            raise ValueError("no data: set dataset_name, or a datasets: mixture in the YAML")
        train, evaluation = train_eval_split(data, script_args.dataset_train_split,
                                             script_args.dataset_test_split)
        if training_args.eval_strategy == "no":
            return train, None  # eval_dataset_name is not even opened
        if self.eval_dataset_name:
            evaluation = load_dataset_any(self.eval_dataset_name)
        return train, evaluation

    def ensure(self):
        """Build the world if asked; return its path or None."""
        if self.tiny_world_dir is None:
            return None
        from .worlds.tiny import WorldSpec, ensure_world

        return ensure_world(self.tiny_world_dir,
                            WorldSpec(seed=self.tiny_world_seed, size=self.tiny_model_size))


def stepping_optimizer(optimizer) -> str:
    """The class of the optimizer that updates the weights, under accelerate's and
    DeepSpeed's wrappers (ZeRO-Offload runs DeepSpeed's CPU Adam for torch's AdamW)."""
    while getattr(optimizer, "optimizer", None) not in (None, optimizer):
        optimizer = optimizer.optimizer
    return type(optimizer).__name__


def run_facts(trainer) -> dict:
    """How the run was laid out: processes, the wrapper around the model (DDP, DeepSpeed,
    FSDP or none), the optimizer that stepped, and parameter counts (ZeRO-3 partitions
    report their full size)."""
    model = trainer.model
    params = list(model.parameters())
    size = [getattr(p, "ds_numel", p.numel()) for p in params]
    quantized = sum(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
    return {"world_size": trainer.args.world_size,
            "distributed_type": trainer.accelerator.distributed_type.value,
            "wrapper": type(trainer.model_wrapped).__name__,
            "optimizer": stepping_optimizer(trainer.optimizer),
            "parameters": sum(size),
            "trainable_parameters": sum(n for n, p in zip(size, params) if p.requires_grad),
            "quantized_linear_layers": quantized,
            "replica_drift": replica_drift(trainer)}


def replica_drift(trainer) -> float | None:
    """The largest difference between processes in any trainable parameter's sum or norm:
    0 when DDP or ZeRO-1/2 kept the replicas in step (two unsynchronised copies drift at
    once). None with one process, or when ZeRO-3 or FSDP shards the weights. Collective:
    every process must call it."""
    from .sharding import weights_sharded

    if trainer.args.world_size < 2 or weights_sharded(trainer.accelerator):
        return None
    params = [p.detach().float() for p in trainer.model.parameters() if p.requires_grad]
    local = torch.stack([torch.stack([p.sum(), p.norm()]) for p in params]).reshape(1, -1)
    every = trainer.accelerator.gather(local.to(trainer.args.device))  # [world, 2 * params]
    return (every - every[0]).abs().max().item()


def whole_model(trainer, model, kind: str):
    """``model``, for process 0 to run alone after training. Under ZeRO-3 or FSDP with
    several processes its weights are slices and every forward is a collective that the
    other processes never join (they wait at the end of ``finish_run``: a hang): there it is
    the whole model just saved to ``output_dir`` (``kind``: "causal_lm" or "reward"),
    loaded again. Call after ``trainer.save_model``, inside ``sharding.whole_loading``."""
    from .sharding import weights_sharded

    if not weights_sharded(trainer.accelerator):
        return model
    folder, device = trainer.args.output_dir, trainer.args.device
    if kind == "reward":
        from .reward import load_reward_model

        return load_reward_model(folder).to(device)
    from .reward import adapter_base

    if adapter_base(folder) is not None:
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(folder).to(device).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).to(device).eval()


def tiny_evaluation(trainer, recipe_args, world, reference_path: str | None, model) -> dict:
    """The oracle's judgement of the policy's samples of held-out prompts, and their KL to
    the model at ``reference_path``: summary entries ``tiny/*``. Process 0 alone."""
    from .worlds.tiny.evaluate import evaluate_policy
    from .worlds.tiny.world import load_split

    prompts = load_split(world, "prompts_eval")["prompt"][: recipe_args.tiny_eval_prompts]
    ref = None
    if reference_path is not None:
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(reference_path).to(trainer.args.device)
    policy = whole_model(trainer, model if model is not None else trainer.model, "causal_lm")
    report = evaluate_policy(policy, trainer.processing_class, prompts, seed=trainer.args.seed,
                             ref_model=ref)
    out = {f"tiny/{k}": v for k, v in report.items() if k not in ("completions", "scores")}
    out["tiny/examples"] = report["completions"][:3]
    return out


def finish_run(trainer, recipe_args: RecipeArguments, world, start: float, summary_name: str,
               dataset_name: str | None, extra: dict | None = None,
               reference_path: str | None = None, model=None, evaluate=None) -> dict:
    """After training, every recipe: save the model, write a summary (losses, time and, in
    the tiny world, the oracle's judgement of held-out samples, and their KL to the model
    at ``reference_path``) as ``summary_name``. ``model``: the policy, when the trainer
    trains more than one module. ``evaluate``: more summary entries from process 0 alone,
    given the saved model (``whole_model``). Then the model card, the push when asked,
    the end."""
    import json
    import time

    from .sharding import whole_loading

    trainer.save_model(trainer.args.output_dir)
    summary = {"train_seconds": time.time() - start, **run_facts(trainer), **(extra or {})}
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    if losses:
        summary["first_logged_loss"], summary["last_logged_loss"] = losses[0], losses[-1]
    summary["log_history"] = trainer.state.log_history
    if trainer.is_world_process_zero():
        with whole_loading():  # process 0 alone loads models here: ZeRO-3 must not split them
            summary.update(evaluate() if evaluate is not None else {})
            if world is not None and recipe_args.tiny_eval_prompts:
                summary.update(tiny_evaluation(trainer, recipe_args, world, reference_path,
                                               model))
    if trainer.is_world_process_zero():
        path = os.path.join(trainer.args.output_dir, summary_name)
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
        shown = {k: v for k, v in summary.items() if k != "log_history"}
        print(json.dumps(shown, indent=2))
    trainer.create_model_card(dataset_name=dataset_name)
    if trainer.args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    # Every process waits here until all are done (process 0 alone evaluated above), then
    # the process group goes: a process that tears it down while its peer still talks to
    # it, or that exits with the group alive, can abort at exit after a finished run.
    trainer.accelerator.wait_for_everyone()
    trainer.end()
    return summary
