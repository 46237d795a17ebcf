"""The tiny world: a controlled-sentiment review task with an exact oracle, built offline.

See ``task`` for the grammar and the oracle, ``corpus`` for the datasets, ``tokenizer``
and ``models`` for the tokenizer and model factories, ``world`` for the on-disk bundle.
"""

from .corpus import (
    BT_SCALE,
    label_pairs,
    policy_preference_pairs,
    preference_pairs,
    prompt_dataset,
    sft_dataset,
    to_conversational,
    unpaired_dataset,
)
from .models import SIZES, build_model
from .task import is_well_formed, oracle_score
from .tokenizer import build_tokenizer
from .world import WorldSpec, build_world, ensure_world

__all__ = [
    "BT_SCALE", "SIZES", "WorldSpec", "build_model", "build_tokenizer", "build_world",
    "ensure_world", "is_well_formed", "label_pairs", "oracle_score", "policy_preference_pairs",
    "preference_pairs", "prompt_dataset", "sft_dataset", "to_conversational",
    "unpaired_dataset",
]
