"""The per-step denominators of the RPO term, counted from the tokenized pairs."""
import numpy as np
from datasets import Dataset

from dpo.step import chosen_token_counts, sft_num_tokens

LABELS = [[-100, -100, 5, 6, 7], [-100, 1, 2], [-100, 9], [3, 4, -100, 5]]


def test_chosen_token_counts_skip_prompt_and_position_zero():
    """Counts of labels ≠ −100 after the causal shift: 3, 2, 1, and 2 (position 0's label 3 is
    never predicted); a select() (indices mapping, or a contiguous slice) is honoured."""
    ds = Dataset.from_dict({"chosen_labels": LABELS})
    assert chosen_token_counts(ds).tolist() == [3, 2, 1, 2]
    assert chosen_token_counts(ds.select([3, 0])).tolist() == [2, 3]
    assert chosen_token_counts(ds.select(range(1, 3))).tolist() == [2, 1]


def test_sft_num_tokens_per_step():
    """Steps {0, 1} and {2, 3} of 2 micro-batches: (3 + 2) / 2 and (1 + 2) / 2."""
    counts = np.array([3, 2, 1, 2])
    assert sft_num_tokens([[0, 1], [2, 3]], counts, micro_batches=2) == [2.5, 1.5]
