"""The prompts online DPO answers: one dataset's prompts, each as the token ids training gives
the prompt of a pair, so that the policy answers exactly the text its pairs will start with.

Any format ``dpo.data`` reads gives its prompts: prompt-only rows (the ``prompts`` format, e.g.
``builtin:demo-prompts``) and the prompts of pairs, rankings or unpaired rows alike (their
responses are set aside). The rows are drawn as ``train.py`` draws them (``num_samples``, the
eval hold-out or test split, streaming); the held-out prompts are what the rounds evaluate on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

from datasets.exceptions import DatasetGenerationError

from dpo import demo
from dpo.config import ConfigError
from dpo.data import load_preference_splits, prepare_tokenizer
from dpo.data.errors import RowProblem
from dpo.data.formats import find_problem
from dpo.data.messages import expand, read_tools_file
from dpo.data.render import unwrap_transcript
from dpo.data.tokenize import _PairTokenizer
from dpo.train.loaders import _root_message, check_local_files

# Stand-in responses: a pair is rendered with them to find the prompt text training would use.
PLACEHOLDERS = ([{"role": "assistant", "content": "x", "fields": ""}],
                [{"role": "assistant", "content": "y", "fields": ""}])
EXAMPLE_ROWS = 3  # row indices the report names per reason


@dataclass(frozen=True)
class Prompt:
    """One prompt to answer."""

    messages: list[dict]  # the prompt as {role, content, ...} messages (`expand`ed): what a judge
    #                       reads; a prompt holding a whole HH transcript as its turns
    ids: list[int]  # the token ids the policy answers: the prompt of a pair, as training has it
    tools: str  # the row's tools as JSON ("" for none), as normalised rows hold them
    chat_template_kwargs: str  # the row's chat-template options as JSON ("" for none)
    row_index: int  # the row in the source split (under streaming, its place in the draw)


def load_prompts(cfg, tokenizer) -> tuple[list[Prompt], list[Prompt], str]:
    """(train prompts, held-out prompts, a one-line report of what was dropped and why).

    Reads ``cfg.dataset`` (one dataset) with the run's data settings, as ``train.py`` would; the
    prompts come in source order (``row_index``). Dropped, counted by reason: rows with a problem
    (``dpo.data.formats``: a missing or empty prompt, ...), repeats of an earlier prompt (same
    messages, tools and template options: ``duplicate``), prompts the chat template cannot
    render or that have no token (the reasons tokenizing gives), and train prompts that are also
    held out (``held_out``). A train prompt that leaves no room for a whole answer (its tokens
    plus the answer's ``sample_max_new_tokens`` and end token over ``max_length``) is dropped
    (``too_long``): training would cut its pairs, and cut their prompt to ``max_prompt_length``
    only when the answers are long, so the policy could not answer the prompt its pairs start
    with. A held-out prompt longer than ``max_prompt_length`` keeps its end (and a leading BOS),
    as train.py's sample prompts do. ``ConfigError`` (one line) when no train prompt is left.
    """
    if len(cfg.dataset) != 1:
        raise ConfigError(f"online rounds draw prompts from one dataset; --dataset names "
                          f"{len(cfg.dataset)} ({', '.join(cfg.dataset)}): give one")
    given = cfg.dataset[0]
    dataset = demo.resolve_dataset(given)
    check_local_files(dataset)  # the held-out prompts are its own (no eval_dataset online)
    try:
        encoder = _encoder(cfg, prepare_tokenizer(tokenizer))
    except ValueError as e:  # no EOS; tools or template options without a chat template
        raise ConfigError(str(e)) from None
    try:
        train_rows, eval_rows = load_preference_splits(
            dataset, num_samples=cfg.num_samples, eval_samples=cfg.eval_samples, seed=cfg.seed,
            data_format=cfg.per_dataset("data_format")[0], split=cfg.per_dataset("split")[0],
            num_proc=cfg.num_proc, dataset_config=cfg.per_dataset("dataset_config")[0],
            data_dir=cfg.per_dataset("data_dir")[0],
            eval_dataset_config=cfg.eval_dataset_config, eval_data_dir=cfg.eval_data_dir,
            eval_split=cfg.eval_split, streaming=cfg.streaming,
            shuffle_buffer_size=cfg.shuffle_buffer_size)
    except (DatasetGenerationError, FileNotFoundError) as e:
        raise ConfigError(f"dataset {given}: {_root_message(e)}") from None
    except ValueError as e:
        raise ConfigError(f"dataset {given}: {e}") from None
    held_out, eval_drops, eval_cut = _prompts_of(eval_rows, encoder)
    answer = (cfg.sample_max_new_tokens or cfg.max_new_tokens) + 1  # its end token too
    train, train_drops, train_cut = _prompts_of(train_rows, encoder, cfg.max_length - answer)
    held = {_key(p) for p in held_out}
    train_drops += [("held_out", p.row_index) for p in train if _key(p) in held]
    train = [p for p in train if _key(p) not in held]
    train_cut = sum(p.row_index in train_cut for p in train)
    report = (f"train prompts: {_summary(len(train), len(train_rows), train_cut, train_drops)}; "
              f"held-out prompts: "
              f"{_summary(len(held_out), len(eval_rows), len(eval_cut), eval_drops)}")
    if not train:
        hint = ("; raise --max-length or lower --sample-max-new-tokens"
                if any(reason == "too_long" for reason, _ in train_drops) else "")
        raise ConfigError(f"dataset {given}: no prompt is left to answer ({report}){hint}")
    return train, held_out, report


def _encoder(cfg, tokenizer) -> _PairTokenizer:
    """What renders and tokenizes the pairs of a run with ``cfg``'s settings (its renderer, BOS
    rule and ``max_prompt_length``)."""
    mode = "plain" if cfg.chat_template == "auto" and tokenizer.chat_template is None \
        else cfg.chat_template
    max_prompt_length = cfg.max_prompt_length or cfg.max_length // 2
    return _PairTokenizer(tokenizer, max_length=cfg.max_length,
                          max_prompt_length=max_prompt_length, mode=mode,
                          prompt_template=cfg.prompt_template,
                          chat_template_kwargs=cfg.chat_template_kwargs,
                          tools=read_tools_file(cfg.tools_file) if cfg.tools_file else None)


def _prompts_of(rows, encoder: _PairTokenizer, longest: int | None = None
                ) -> tuple[list[Prompt], list[tuple], set[int]]:
    """The usable prompts of normalised ``rows`` in source order (a repeat's first row is kept),
    the drops as ``(reason, row_index)``, and the rows whose prompt was cut to
    ``max_prompt_length``; with ``longest``, a prompt over ``longest`` tokens is dropped
    (``too_long``) instead of cut."""
    prompts, drops, seen, cut = [], [], set(), set()
    columns = rows.select_columns(["prompt", "tools", "chat_template_kwargs", "row_index",
                                   "problem"])
    for row in sorted(columns, key=lambda row: row["row_index"]):
        where = row["row_index"]
        # Pairs' prompts are checked as tokenizing checks them (prompt-only rows already were).
        problem = row["problem"] or find_problem(row["prompt"], [], [], prompt_only=True)
        if problem:
            drops.append((str(problem).partition(":")[0], where))
            continue
        prompt = Prompt(messages=[expand(m) for m in unwrap_transcript(row["prompt"])], ids=[],
                        tools=row["tools"], chat_template_kwargs=row["chat_template_kwargs"],
                        row_index=where)
        if _key(prompt) in seen:
            drops.append(("duplicate", where))
            continue
        seen.add(_key(prompt))
        try:
            ids = prompt_ids(encoder, row)
        except RowProblem as problem:
            drops.append((str(problem).partition(":")[0], where))
            continue
        if longest is not None and len(ids) > longest:
            drops.append(("too_long", where))
            continue
        if len(ids) > encoder.max_prompt_length:
            cut.add(where)
        prompts.append(replace(prompt, ids=_keep_end(ids, encoder.max_prompt_length,
                                                     encoder.bos_id)))
    return prompts, drops, cut


def prompt_ids(encoder: _PairTokenizer, row: dict) -> list[int]:
    """The untruncated token ids of a normalised row's prompt, as training's pair of it starts:
    the prompt text its renderer picks for a pair of stand-in answers, tokenized, with the BOS
    the tokenizer adds. ``RowProblem`` when the row cannot be rendered or has no token."""
    chosen, rejected = PLACEHOLDERS
    text = encoder.renderer.split_texts({**row, "chosen": chosen, "rejected": rejected})[0]
    ids = encoder.with_bos(encoder.tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise RowProblem("no_prompt_tokens", "the prompt has no tokens and the tokenizer adds "
                         "no BOS")
    return ids


def _keep_end(ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    """``ids`` cut to their last ``limit`` tokens, a leading BOS kept, as training cuts a prompt
    (``dpo.data.tokenize._PairTokenizer.truncate_and_label``)."""
    if len(ids) <= limit:
        return ids
    keep_bos = bos_id is not None and ids[:1] == [bos_id]
    tail = ids[len(ids) - limit + keep_bos:]
    return [bos_id, *tail] if keep_bos else tail


def _key(prompt: Prompt) -> tuple:
    """Prompts with equal keys are rendered alike: a duplicate is dropped."""
    return json.dumps(prompt.messages), prompt.tools, prompt.chat_template_kwargs


def _summary(kept: int, total: int, cut: int, drops: list[tuple]) -> str:
    """``kept K of N (C truncated), dropped D: reason count (rows ...); ...``."""
    line = f"kept {kept} of {total} ({cut} truncated)"
    if not drops:
        return line + ", dropped none"
    rows: dict[str, list[int]] = {}
    for reason, row in drops:
        rows.setdefault(reason, []).append(row)
    reasons = [f"{reason} {len(found)} (rows {', '.join(map(str, sorted(found)[:EXAMPLE_ROWS]))}"
               f"{', ...' if len(found) > EXAMPLE_ROWS else ''})" for reason, found in rows.items()]
    return f"{line}, dropped {len(drops)}: " + "; ".join(reasons)
