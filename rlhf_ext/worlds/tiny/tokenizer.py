"""A byte-level BPE tokenizer trained on the tiny world's corpus, with a chat template.

Byte-level, so any text encodes (no unknown token); every grammar word ends up as one
token. Special tokens: ``<|pad|>`` (pad, distinct from eos), ``<|eos|>``, and the role
markers of the chat template. The template marks assistant turns with
``{% generation %}`` so ``return_assistant_tokens_mask=True`` works.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .corpus import sft_dataset
from .task import ASPECTS, LEXICON, OPENERS, TITLES

PAD, EOS = "<|pad|>", "<|eos|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [PAD, EOS] + [f"<|{r}|>" for r in ROLES]

# transformers 5 renders with trim_blocks; this template has no newlines at all.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %} {{ message['content'] }}" + EOS + "{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _training_text(seed: int) -> list[str]:
    """Reviews of the corpus plus every word alone, so rare words still become tokens."""
    data = sft_dataset(2000, seed=seed)
    lines = [p + c for p, c in zip(data["prompt"], data["completion"])]
    words = set(LEXICON) | set(ASPECTS) | {w for t in TITLES + OPENERS for w in t.split()}
    rng = random.Random(seed)
    for _ in range(5):
        shuffled = sorted(words)
        rng.shuffle(shuffled)
        lines.append(" ".join(shuffled))
    return lines


def build_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the BPE tokenizer (about a second) and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=SPECIAL_TOKENS[2:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
