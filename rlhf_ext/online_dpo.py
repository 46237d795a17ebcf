"""Online (iterative) DPO from an AI judge: OnlineDPOConfig / OnlineDPOTrainer.

Round after round: sample ``num_generations`` completions per prompt from the current
policy; a judge (``rlhf_ext.judges``: a causal LM, a reward model or a function) labels
pairs of them, soft labels kept in ``chosen_probability``; a ``PreferenceTrainer`` trains on
those pairs for ``num_train_epochs``. The reference stays the initial policy (with LoRA: the
base with adapters off; otherwise a frozen copy taken before round 0).

Each round is an ordinary Trainer run under ``output_dir/round-<r>`` (its callbacks,
logging, checkpoints and model card); its samples (``samples.json``), labels
(``labels.jsonl``, appended batch by batch) and the trained model are kept there, and
``rounds.json`` and the final policy are written to ``output_dir`` itself. ``train(resume_from_checkpoint=True)``
skips finished rounds (loading the last one's weights), reuses a round's samples and labels,
and resumes its training from the newest checkpoint. With several processes (DDP, ZeRO-2)
each samples and judges its share of a round's prompts (``samples-<process>.json``,
``labels-<process>.jsonl``) and all train on every process's pairs.
"""

from __future__ import annotations

import copy
import json
import os
import random
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import mean

from .config_fields import VLLMFields, model_init
from .data import SOFT_LABEL, DataError, validate_prompt_dataset
from .judges import PairwiseJudge, comparisons, label_samples
from .models import add_adapters, is_peft_model, is_quantized, load_causal_lm, load_tokenizer
from .preference import PreferenceConfig, PreferenceTrainer
from .reference import _frozen_copy
from .sharding import sharding_requested, whole_everywhere
from .trainer_utils import check_finite_fields, last_complete_checkpoint

DONE = "round.json"  # written last in a round folder: the round is finished


@dataclass
class OnlineDPOConfig(VLLMFields, PreferenceConfig):
    """PreferenceConfig (the loss, beta and the rest as offline) plus the rounds; sampling
    field names and defaults as TRL's OnlineDPOConfig (max_new_tokens 64, temperature 0.9),
    ``use_vllm`` and the vLLM fields as TRL's."""

    completions_are_samples = True  # an empty sample (eos first) is trained on

    num_rounds: int = field(default=2, metadata={
        "help": "Rounds of sample -> judge -> train."})
    num_generations: int = field(default=2, metadata={
        "help": "Completions sampled per prompt each round; pairs of them are judged."})
    prompts_per_round: int | None = field(default=None, metadata={
        "help": "Prompts drawn (without replacement, seeded per round) each round; None: all."})
    pairing: str = field(default="all", metadata={
        "help": "Which samples of a prompt are judged against each other: 'all' (every two) "
                "or 'disjoint' ((0, 1), (2, 3), ...)."})
    soft_labels: bool = field(default=True, metadata={
        "help": "Train on the judge's probabilities (True) or on its hard choices."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens sampled per completion."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1.0: off)."})
    generation_batch_size: int = field(default=32, metadata={
        "help": "Prompts sampled at once."})
    judge_batch_size: int = field(default=64, metadata={
        "help": "Comparisons handed to the judge at once (labels are saved per batch)."})

    def __post_init__(self):
        super().__post_init__()
        check_finite_fields(self, ("temperature", "top_p"))
        if self.num_rounds < 1 or self.num_generations < 2:
            raise ValueError(f"online DPO needs num_rounds >= 1 and num_generations >= 2 (a pair "
                             f"per prompt), got {self.num_rounds} and {self.num_generations}")
        if self.pairing not in ("all", "disjoint"):
            raise ValueError(f"pairing must be 'all' or 'disjoint', got {self.pairing!r}")
        if not self.paired:
            raise ValueError(f"online DPO judges pairs; loss {self.loss_type} is unpaired")
        self.check_vllm_mode()


class OnlineDPOTrainer:
    """Iterative DPO on the Trainer API (see the module docstring). ``judge`` is a
    ``rlhf_ext.judges.PairwiseJudge``; ``train_dataset`` has a ``prompt`` column (text or
    conversations). After ``train()``, ``trainer`` is the last round's PreferenceTrainer and
    ``rounds`` the per-round summaries; ``save_model`` / ``push_to_hub`` go through it."""

    def __init__(self, model, judge: PairwiseJudge, args: OnlineDPOConfig | None = None,
                 train_dataset=None, processing_class=None, ref_model=None, callbacks=None,
                 peft_config=None):
        if args is None:
            args = OnlineDPOConfig(output_dir="online-dpo-output")
        if not isinstance(judge, PairwiseJudge):
            raise TypeError(f"judge must be a rlhf_ext.judges.PairwiseJudge (LMJudge, "
                            f"RewardModelJudge, or FunctionJudge around a scoring function), "
                            f"got {type(judge).__name__}")
        if args.world_size > 1 and args.use_vllm:
            raise ValueError("OnlineDPOTrainer on several processes samples with "
                             "transformers, each process its share: launch it without vLLM "
                             "(or with one process)")
        if train_dataset is None:
            raise DataError("train_dataset is required: a 'prompt' column to sample from")
        validate_prompt_dataset(train_dataset)
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
        if isinstance(model, str):
            model = load_causal_lm(model, **model_init(args))
        if isinstance(ref_model, str):
            ref_model = load_causal_lm(ref_model, **model_init(args))
        if peft_config is not None:
            model = add_adapters(model, peft_config, args.gradient_checkpointing, args.seed)
        # ZeRO-3, FSDP: the policy and reference kept here stay whole on every process (they
        # sample between rounds); each round trains copies of them, sharded by its Trainer
        self._sharded = args.world_size > 1 and sharding_requested() is not None
        if self._sharded:
            model = whole_everywhere(model)
            ref_model = whole_everywhere(ref_model) if ref_model is not None else None
        if not is_quantized(model) and getattr(model, "hf_device_map", None) is None:
            model.to(args.device)  # round 0 samples before a Trainer would place it
        if ref_model is None and not is_peft_model(model) and args.needs_reference:
            ref_model = (copy.deepcopy(model) if self._sharded else _frozen_copy(model)) \
                .eval().requires_grad_(False)  # the initial policy
        self.model, self.ref_model, self.judge, self.args = model, ref_model, judge, args
        self.processing_class = load_tokenizer(processing_class, name)
        self.prompts = list(train_dataset["prompt"])
        self.callbacks = callbacks
        self.trainer: PreferenceTrainer | None = None
        self.rounds: list[dict] = []
        self.engine = None  # vLLM with use_vllm: started by the first sampling round

    # -- one round's parts -------------------------------------------------------------------

    def round_prompts(self, r: int) -> list:
        n = self.args.prompts_per_round
        if n is None or n >= len(self.prompts):
            return self.prompts
        return random.Random(self.args.seed + r).sample(self.prompts, n)

    def _file(self, folder: Path, name: str) -> Path:
        """``folder/name``; with several processes each writes its own (``samples-1.json``)."""
        if self.args.world_size == 1:
            return folder / name
        stem, suffix = name.split(".", 1)
        return folder / f"{stem}-{self.args.process_index}.{suffix}"

    def sample(self, prompts: list, r: int, folder: Path,
               positions: list[int] | None = None) -> list[list[str]]:
        """``num_generations`` completions of each prompt from the current policy, saved to
        (and on resume read from) ``folder/samples.json`` (this process's share:
        ``samples-<process>.json``). ``positions``: each prompt's place in the round
        (default 0, 1, ...), which keys its samples' random streams: a prompt gets the
        same samples whichever process draws it."""
        from .ppo.rollout import render_prompt
        from .sampling import generate_completions

        path = self._file(folder, "samples.json")
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON ({error}); it was cut short or "
                                 f"edited: delete it to sample round {r} again") from None
        tok, args, k = self.processing_class, self.args, self.args.num_generations
        rendered = [p for p in (render_prompt(tok, p) for p in prompts) for _ in range(k)]
        decoding = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed + 1000 * r,
                        row_keys=[p * k + g for p in (positions or range(len(prompts)))
                                  for g in range(k)])
        if args.use_vllm:
            texts = self._vllm(rendered).generate(rendered, **decoding).texts
        else:
            texts = generate_completions(self.model, tok, rendered, **decoding,
                                         batch_size=args.generation_batch_size,
                                         progress=True).texts
        samples = [texts[i:i + k] for i in range(0, len(texts), k)]
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a kill leaves no half file
        tmp.write_text(json.dumps(samples))
        tmp.replace(path)
        return samples

    def _vllm(self, rendered: list[str]):
        """The vLLM engine holding the current policy: started by the first round that
        samples, given the trained weights by each later one."""
        if self.engine is not None:
            self.engine.sync(self.model)
            return self.engine
        from .vllm_server import make_engine

        longest = max(len(ids) for ids in self.processing_class(
            rendered, add_special_tokens=False)["input_ids"])
        self.engine = make_engine(self.model, self.processing_class, self.args,
                                  longest + self.args.max_new_tokens, len(rendered))
        return self.engine

    def _load_round(self, folder: Path) -> None:
        """The weights a finished round saved, into the policy."""
        from safetensors.torch import load_file

        if is_peft_model(self.model):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_file(folder / "adapter_model.safetensors"))
            return
        missing, unexpected = self.model.load_state_dict(load_file(folder / "model.safetensors"),
                                                         strict=False)
        out, inp = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        tied = out is not None and out.weight is inp.weight
        if unexpected or [k for k in missing if not (tied and k.endswith("lm_head.weight"))]:
            raise ValueError(f"{folder} does not hold this policy's weights (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]})")

    # -- the loop -------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None):
        """Run the rounds; with ``resume_from_checkpoint`` (True) continue where a previous
        run stopped. Returns the per-round summaries."""
        try:
            return self._train(bool(resume_from_checkpoint))
        finally:
            if self.engine is not None:  # vLLM's memory and process group go with it
                self.engine.close()
                self.engine = None

    def _train(self, resume: bool) -> list[dict]:
        args, out = self.args, Path(self.args.output_dir)
        self.rounds, finished = [], None
        for r in range(args.num_rounds):
            folder = out / f"round-{r}"
            if resume and (folder / DONE).exists():
                self.rounds.append(json.loads((folder / DONE).read_text()))
                finished = folder
                continue
            if finished is not None:
                self._load_round(finished)
                finished = None
            self.rounds.append(self._round(r, folder, resume))
            if self.args.process_index == 0:
                (out / "rounds.json").write_text(json.dumps(self.rounds, indent=2))
        if finished is not None:  # every round was already done
            self._load_round(finished)
        elif self.trainer is not None:  # the final policy in output_dir itself too
            self.trainer.save_model(str(out))
        return self.rounds

    def _round(self, r: int, folder: Path, resume: bool) -> dict:
        args = self.args
        if not resume:
            _discard_stale(folder, [self._file(folder, n) for n in ("samples.json",
                                                                    "labels.jsonl")])
        # each process samples and judges its share of the round's prompts; all train on all
        everyone = self.round_prompts(r)
        share = range(args.process_index, len(everyone), args.world_size)
        prompts = [everyone[i] for i in share]
        samples = self.sample(prompts, r, folder, list(share))
        data = label_samples(self.judge, prompts, samples, args.pairing, args.judge_batch_size,
                             self._file(folder, "labels.jsonl"))
        if args.world_size > 1:
            data = _gathered_rows(data, len(comparisons([range(args.num_generations)],
                                                         args.pairing)))
        summary = {"round": r, "pairs": len(data),
                   "judge/chosen_probability": mean(data[SOFT_LABEL]),
                   "judge/order_agreement": mean(map(float, data["order_agreement"]))}
        if not args.soft_labels:
            data = data.remove_columns(SOFT_LABEL)
        round_args = replace(args, output_dir=str(folder), seed=args.seed + r)
        trainee, reference = self.model, self.ref_model
        if self._sharded:  # the Trainer shards its own copies
            trainee = copy.deepcopy(self.model)
            reference = copy.deepcopy(self.ref_model) if self.ref_model is not None else None
        self.trainer = PreferenceTrainer(trainee, reference, round_args,
                                         train_dataset=data,
                                         processing_class=self.processing_class,
                                         callbacks=self.callbacks)
        checkpoint = last_complete_checkpoint(str(folder)) if resume else None
        result = self.trainer.train(resume_from_checkpoint=checkpoint)
        summary["train_loss"] = result.training_loss
        self.trainer.log({k: v for k, v in summary.items() if k != "pairs"})
        self.trainer.save_model(str(folder))
        if self.trainer.is_world_process_zero():
            (folder / DONE).write_text(json.dumps(summary, indent=2))
        self.trainer.accelerator.wait_for_everyone()
        if self._sharded:  # the trained weights, whole, for the next round's sampling
            self._load_round(folder)
        return summary

    def save_model(self, output_dir: str | None = None) -> None:
        self._last().save_model(output_dir or self.args.output_dir)

    def push_to_hub(self, **kwargs):
        """The last round's Trainer pushes its folder: the final policy (an adapter with
        LoRA), its model card, and that round's samples and judged labels."""
        return self._last().push_to_hub(**kwargs)

    def _last(self) -> PreferenceTrainer:
        if self.trainer is None:
            raise RuntimeError("no round has been trained yet: call train() first")
        return self.trainer


def _gathered_rows(data, per_prompt: int):
    """Every process's judged pairs on every process, in the round's prompt order (process
    p judged prompts p, p + world, ..., ``per_prompt`` pairs each): the dataset one process
    judging every prompt builds, so that training sees the same batches. Collective."""
    from accelerate.utils import gather_object
    from datasets import Dataset

    blocks = [[part[i:i + per_prompt] for i in range(0, len(part), per_prompt)]
              for part in gather_object([data.to_list()])]
    rows = [row for j in range(max(map(len, blocks))) for part in blocks if j < len(part)
            for row in part[j]]
    return Dataset.from_list(rows)


def _discard_stale(folder: Path, files: list[Path]) -> None:
    """A fresh start (no resume) in a folder an earlier run wrote: its samples, labels
    (``files``: this process's) and done marker belong to that run (another policy, maybe
    another judge), so they are removed, with a warning naming them, and made anew; only a
    resume reuses them."""
    stale = [path for path in (*files, folder / DONE) if path.exists()]
    if stale:
        warnings.warn(f"not resuming: removing {', '.join(map(str, stale))} from an earlier "
                      "run; they are sampled and judged again (pass resume_from_checkpoint="
                      "True to continue that run instead)", stacklevel=3)
        for path in stale:
            path.unlink(missing_ok=True)  # another process may have removed the marker
