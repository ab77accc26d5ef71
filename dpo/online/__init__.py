"""Online DPO (`train.py --rounds N`, docs/online.md): rounds in which the policy answers the
prompts, a judge scores the answers, and DPO trains on each prompt's best answer against its
worst — the policy learning from its own judged answers.

- `prompts.py`: the prompts of `--dataset` (any format, or prompt-only rows), tokenized as
  training tokenizes a pair's prompt; the eval rows are the held-out prompts;
- `pairs.py`: a round's pairs from its scored answers, and what the round measures;
- `rounds.py`: the loop, each phase a file, resumable in any phase.

Sampling and judging are `dpo.eval.generation.sample_answers` and `dpo.eval.judges`.
"""
