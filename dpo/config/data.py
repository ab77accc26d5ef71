"""The data section: which preference datasets, which rows of them, and how a pair becomes
tokens. The data code makes its own checks again as it loads; here they run before anything
loads."""
from __future__ import annotations

from dataclasses import dataclass

from dpo.config.fields import ConfigError, _opt, check_at_least
from dpo.data import DATA_FORMATS
from dpo.data.mixture import PER_DATASET, check_mixture
from dpo.data.sources import check_streaming
from dpo.data.messages import check_template_inputs
from dpo.data.render import check_text_settings


@dataclass
class DataSection:
    """data: datasets and mixtures (dpo.data.mixture), which rows (dpo.data.sources), and
    tokenisation (dpo.data.render, dpo.data.tokenize)"""

    dataset: list[str] = _opt(["lvwerra/stack-exchange-paired"], "hub name, or a local file or "
                              "folder; several make a mixture (see dataset_weights)")
    data_format: list[str | None] | None = _opt(None, "override the format detected from the "
                                                "columns (one for all datasets, or one each)")
    num_samples: int | None = _opt(1000, "rows drawn (seeded) from the train split(s); null = all")
    eval_samples: int | None = _opt(None, "eval rows (a mixture's total, split like num_samples); "
                                    "default 10%% of num_samples, 1..200 per dataset")
    # Mixtures: how num_samples is shared out among the datasets
    dataset_weights: list[float] | None = _opt(None, "each dataset's share of num_samples (and "
                                               "of eval_samples), normalised; default equal")
    dataset_num_samples: list[int] | None = _opt(None, "rows drawn from each dataset, instead of "
                                                 "weights; num_samples is then their sum")
    # Which rows: subsets, splits, streaming
    dataset_config: list[str | None] | None = _opt(None, "hub config (subset) name, as "
                                                   "load_dataset(name=...); one for all or each")
    data_dir: list[str | None] | None = _opt(None, "subfolder of the dataset to read, as "
                                             "load_dataset(data_dir=...), e.g. data/rl; one for "
                                             "all or one each (none: the whole dataset)")
    split: list[str] = _opt(["train"], "split to draw from (one for all or one each); a slice "
                            "such as train[:5%%] works when not streaming")
    eval_dataset: str | None = _opt(None, "dataset for eval rows (default: --dataset; not with "
                                    "a mixture, whose datasets each give their own)")
    eval_dataset_config: str | None = _opt(None, "its config (default: --dataset-config when "
                                           "eval_dataset is the same)")
    eval_data_dir: str | None = _opt(None, "its subfolder (default: --data-dir when eval_dataset "
                                     "is the same)")
    eval_split: str | None = _opt(None, "eval split, of every dataset (default: a "
                                  "test/validation split if any, else rows held out of the draw); "
                                  "a slice of --split's split (train[80%%:]) is read whole and "
                                  "must not overlap --split")
    streaming: bool | None = _opt(None, "stream the data and read only the rows drawn (default: "
                                  "on for a hub dataset when num_samples is set)")
    shuffle_buffer_size: int = _opt(10_000, "rows in the streamed shuffle's buffer: a draw reads "
                                    "about num_samples + this many rows, over shuffled shards")
    # Tokenisation
    max_length: int = _opt(512, "tokens per prompt+response sequence")
    max_prompt_length: int | None = _opt(None, "prompt tokens kept (its end); max_length // 2")
    chat_template: str = _opt("auto", "how a pair becomes text: auto = the tokenizer's chat "
                              "template (plain without one); plain = '\\n\\nHuman: ..."
                              "\\n\\nAssistant: ...'; none = prompt and response strings as "
                              "they are, EOS appended (base models). --use-chat-template / "
                              "--no-use-chat-template mean auto / plain",
                              choices=("auto", "none", "plain"))
    prompt_template: str | None = _opt(None, "with chat_template none: the prompt's text, {prompt} "
                                       "standing for the prompt field, e.g. 'Question: {prompt}"
                                       "\\n\\nAnswer: ' (a \\n or \\t written as two "
                                       "characters, as a shell passes it, means newline or tab)")
    chat_template_kwargs: dict | None = _opt(None, "options for every chat-template rendering "
                                             "(training and eval pairs, generation prompts), "
                                             "e.g. {enable_thinking: false}; JSON on the "
                                             "command line; a row's chat_template_kwargs "
                                             "column updates them for that row")
    tools_file: str | None = _opt(None, "JSON file holding a list of tool schemas given to the "
                                  "chat template for every row without its own tools column")
    strict_data: bool = _opt(False, "fail on the first invalid row instead of skipping it")
    max_responses: int = _opt(8, "most responses a ranked row may hold (each is a sequence of "
                              "the forward); a dataset with a row over it stops the run")
    group_by_length: bool = _opt(True, "batch pairs of similar length to cut padding")
    padding_free: bool | None = _opt(None, "pack each micro-batch's sequences end to end in "
                                     "rows (position ids restarting at each), no padding; "
                                     "checked against separate sequences at start-up. Default: "
                                     "on for sdpa models that pass the check, else off (said "
                                     "in one line)")
    padding_free_max_tokens: int = _opt(4096, "longest packed row; sequences beyond it go to "
                                        "more rows (attention builds an L x L mask per row)")
    share_prompt: bool | None = _opt(None, "lay each pair out once as [prompt | chosen | "
                                     "rejected] (a ranking as [prompt | r1 | ... | rN]), the "
                                     "prompt computed once for all its responses "
                                     "(packed with padding_free); checked against separate "
                                     "sequences at start-up. Default: on for packed rows on CPU "
                                     "where the check passes, else off (said in one line)")
    num_proc: int | None = _opt(None, "processes for tokenisation (datasets.map)")
    tokenize_cache: bool = _opt(True, "keep the tokenized pairs under $DPO_CACHE_DIR/tokenized "
                                "and load them when the rows, tokenizer and settings recur")

    def _validate_data(self) -> None:
        check_at_least(self, 1, "max_length", "num_samples", "num_proc", "max_prompt_length",
                       "padding_free_max_tokens", "shuffle_buffer_size")
        check_at_least(self, 0, "eval_samples")
        check_at_least(self, 2, "max_responses")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be below "
                              f"max_length ({self.max_length}) to leave room for the response")
        if self.padding_free is True and self.padding_free_max_tokens < self.max_length:
            raise ConfigError(f"padding_free_max_tokens ({self.padding_free_max_tokens}) must be "
                              f">= max_length ({self.max_length}): every sequence must fit a row")
        for data_format in self.data_format or []:
            if data_format is not None and data_format not in DATA_FORMATS:
                raise ConfigError(f"data_format: {data_format!r} is not one of "
                                  f"{', '.join(DATA_FORMATS)}")
        try:
            check_text_settings(self.chat_template, self.prompt_template)
            check_template_inputs(self.chat_template, self.chat_template_kwargs, self.tools_file)
            for split in self.split:
                check_streaming(self.streaming, self.num_samples, split, self.eval_split)
            check_mixture(self.dataset, weights=self.dataset_weights,
                          counts=self.dataset_num_samples, num_samples=self.num_samples,
                          per_dataset={name: getattr(self, name) for name in PER_DATASET},
                          eval_dataset=self.eval_dataset)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def per_dataset(self, name: str) -> list:
        """A per-dataset field's value for each dataset: one value given stands for all."""
        value = getattr(self, name)
        values = [None] if value is None else value
        return values * len(self.dataset) if len(values) == 1 else list(values)
