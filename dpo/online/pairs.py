"""A round's pairs: each prompt's best-scored answer against its worst, and what the round's
answers and pairs measure (score, acceptance, length: online DPO's known failure is to learn that
longer answers win, so the lengths of chosen and rejected are reported side by side)."""
from __future__ import annotations

import json
import statistics
from collections.abc import Callable


def best_and_worst(scores: list[float]) -> tuple[int, int] | None:
    """`(best, worst)` answer indices, the first of each among equal scores; None when the best
    and the worst tie (every answer scored alike): such a prompt teaches nothing."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return None if scores[best] == scores[worst] else (best, worst)


def group_record(prompt, samples, scores: list[float]) -> dict:
    """One prompt's line of `samples.jsonl`: the prompt, its K answers with their scores, token
    counts and whether each ended, and which two make its pair (null and null: skipped)."""
    picked = best_and_worst(scores)
    return {"prompt": prompt.messages, "tools": prompt.tools,
            "chat_template_kwargs": prompt.chat_template_kwargs, "row_index": prompt.row_index,
            "answers": [s.text for s in samples], "scores": scores,
            "num_tokens": [s.num_tokens for s in samples],
            "finished": [s.finished for s in samples],
            "chosen": picked and picked[0], "rejected": picked and picked[1]}


def pair_rows(records: list[dict]) -> list[dict]:
    """The round's training pairs in the conversational format (`dpo.data.formats`), with the
    row's tools and template options where it has them: `train.py --dataset pairs.jsonl` trains
    on them offline as the round did."""
    rows = []
    for record in records:
        if record["chosen"] is None:
            continue
        row = {"prompt": record["prompt"]}
        for side in ("chosen", "rejected"):
            row[side] = [{"role": "assistant", "content": record["answers"][record[side]]}]
        if record["tools"]:
            row["tools"] = json.loads(record["tools"])
        if record["chat_template_kwargs"]:
            row["chat_template_kwargs"] = json.loads(record["chat_template_kwargs"])
        rows.append(row)
    return rows


def round_metrics(records: list[dict], accepts: Callable[[float], bool | None]) -> dict:
    """What the round's sampled answers and its pairs measure, keyed for `metrics.jsonl`."""
    scores = [s for r in records for s in r["scores"]]
    lengths = [n for r in records for n in r["num_tokens"]]
    kept = [r for r in records if r["chosen"] is not None]
    metrics = {"samples/score/mean": statistics.fmean(scores),
               "samples/score/std": statistics.pstdev(scores),
               "samples/length": statistics.fmean(lengths),
               "samples/unfinished": 1 - statistics.fmean(f for r in records
                                                          for f in r["finished"])}
    if accepts(scores[0]) is not None:
        metrics["samples/acceptance"] = statistics.fmean(map(accepts, scores))
    metrics.update({"pairs/kept": len(kept), "pairs/skipped_tied": len(records) - len(kept)})
    if kept:
        for side in ("chosen", "rejected"):
            metrics[f"pairs/length/{side}"] = statistics.fmean(r["num_tokens"][r[side]]
                                                               for r in kept)
        metrics["pairs/score_gap"] = statistics.fmean(
            r["scores"][r["chosen"]] - r["scores"][r["rejected"]] for r in kept)
    return metrics


def table(rows: list[dict]) -> str:
    """The rounds side by side: the held-out answers' acceptance (else mean score), win rate
    against the start's and length; the round's sampled answers' acceptance (else mean score),
    its pairs and their chosen and rejected lengths (round 0: the start, held-out only)."""
    kind = "acceptance" if "samples/acceptance" in rows[-1] else "score"
    lines = ["round  held-out: " + f"{kind:<11}win rate  length  samples: {kind:<11}pairs  "
             "chosen/rejected length"]
    for row in rows:
        line = f"{row['round']:<17}" + "".join(
            _cell(row.get(key), width, digits) for key, width, digits in
            ((f"heldout/{kind}", 11, 3), ("heldout/win_rate", 10, 3), ("heldout/length", 8, 1)))
        if "pairs/kept" in row:
            line += " " * 9 + _cell(row["samples/acceptance" if kind == "acceptance"
                                        else "samples/score/mean"], 11, 3)
            line += (f"{row['pairs/kept']:<7}{row.get('pairs/length/chosen', 0):.1f} / "
                     f"{row.get('pairs/length/rejected', 0):.1f}")
        lines.append(line.rstrip())
    return "\n".join(lines)


def _cell(value: float | None, width: int, digits: int) -> str:
    """A number of the table, `-` where not measured (no held-out prompts)."""
    return f"{'-' if value is None else f'{value:.{digits}f}':<{width}}"


def summary(metrics: dict) -> str:
    """A round's metrics on one line."""
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in metrics.items())
