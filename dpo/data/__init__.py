"""Preference data for DPO: load, hold out, tokenize, validate, batch — one module per stage.

The pipeline, in the order the trainer calls it:

1. ``load_preference_splits`` (``sources``) loads a hub dataset or a local file/folder with
   ``datasets.load_dataset``, draws ``num_samples`` rows with a seeded shuffle, holds out eval rows
   (or takes them from the dataset's own test split) and normalises every row to messages
   (``formats``: columns ``prompt``, ``chosen``, ``rejected``, ``row_index``, ``problem``).
   A mixture of datasets (``mixture``) shares ``num_samples`` out among them and loads each so.
2. ``prepare_tokenizer`` (``tokenize``) gives a tokenizer without a pad token its EOS as pad token.
3. ``tokenize_preferences`` (``tokenize``) renders each pair (``render``: chat template or plain
   text), tokenizes, truncates and validates it with ``Dataset.map``, skips bad rows and counts
   them in a ``FilterReport`` (``report``); ``cache`` keeps the result on disk.
4. ``LengthGroupedBatchSampler`` (``batching``) groups pairs of similar length into
   micro-batches, and ``PreferenceCollator`` pads them into one ``[chosen; rejected]`` batch.

Tokenized rows have the columns ``chosen_input_ids``/``rejected_input_ids`` (prompt + response),
``chosen_labels``/``rejected_labels`` (the same ids with -100 on the prompt), ``length`` (the
longer of the two sequences, for length grouping) and ``row_index`` (the row in the source split).
``dpo.train.reference_cache`` may add ``ref_chosen_logps``/``ref_rejected_logps``, the reference's
precomputed summed log-probs. KTO's unpaired rows (``unpaired``) add ``label`` and hold their one
completion on both sides; the collator puts the KL estimate's mismatched completion in the
rejected rows. Rankings of N responses (``ranked``) add ``more_input_ids``/``more_labels``
(ranks 3..N) and ``stages``, and batch as K slots ``[rank 1; rank 2; ...]``.

Vision pairs (an ``images`` column, ``images``) are tokenized with the model's processor
(``vision_tokenize.tokenize_pairs``), keep ``images`` (bytes) and add ``image_tokens``; the
``VisionCollator`` (``vision_batching``) adds each pair's pixels once.
"""
from dpo.data.batching import (REF_LOGPS_COLUMNS, LengthGroupedBatchSampler,
                                PreferenceCollator, padding_fraction)
from dpo.data.formats import DATA_FORMATS, DROP_REASONS
from dpo.data.draw import default_eval_samples
from dpo.data.sources import load_preference_splits
from dpo.data.report import FilterReport
from dpo.data.tokenize import IGNORE_INDEX, prepare_tokenizer, tokenize_preferences
from dpo.data.vision_batching import VisionCollator

__all__ = [
    "DATA_FORMATS",
    "DROP_REASONS",
    "IGNORE_INDEX",
    "FilterReport",
    "LengthGroupedBatchSampler",
    "PreferenceCollator",
    "REF_LOGPS_COLUMNS",
    "VisionCollator",
    "default_eval_samples",
    "load_preference_splits",
    "padding_fraction",
    "prepare_tokenizer",
    "tokenize_preferences",
]
