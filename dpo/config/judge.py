"""What `--judge` may name, checked before anything loads: the demo's rule, a function by its
import path (imported, to be found and callable), or a reward model whose config and tokenizer
are read (not its weights) and whose chat template must render a conversation.
`dpo.eval.judges` loads the judge through the same checks."""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from jinja2 import TemplateError

from dpo.config.fields import ConfigError
from dpo.data.messages import expand

DEMO_RULE = "builtin:demo-rule"
PROBE = [{"role": "user", "content": "Hi."}]  # a conversation every chat template must render


def check_judge(cfg) -> None:
    """ConfigError, before anything loads, for a `--judge` that names nothing loadable; a local
    reward model's config and tokenizer are read (not its weights) and its template tried."""
    judge = cfg.judge
    if judge is None or judge == DEMO_RULE:
        return
    if judge.startswith("builtin:"):
        raise ConfigError(f"judge {judge}: no such builtin judge (there is {DEMO_RULE})")
    if is_function(judge):
        judge_function(judge)
        return
    path = Path(judge).expanduser()
    if judge.startswith(("/", ".", "~")) and not path.is_dir():
        raise ConfigError(f"judge {judge}: no such directory (give a reward model's directory "
                          f"or hub name, or {DEMO_RULE})")
    if path.is_dir():  # a hub name is checked as it loads (no download here)
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(judge, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ConfigError(f"judge {judge}: cannot load it as a reward model (its config): "
                              f"{first_line(e)}") from None
        check_labels(judge, config)
        reward_tokenizer(judge, cfg.trust_remote_code)


def is_function(judge: str) -> bool:
    """Whether `judge` names a function: `package.module:function` or `path/to/file.py:function`
    (a hub name has no colon; a directory is a reward model's, whatever its name)."""
    return (":" in judge and not judge.startswith("builtin:")
            and not Path(judge).expanduser().is_dir())


def judge_function(judge: str):
    """The function `judge` names (`package.module:function`, or `path/to/file.py:function` with
    the path relative to the working directory); ConfigError (one line) unless it imports, has
    that attribute and the attribute is callable."""
    where, _, name = judge.rpartition(":")
    if not where or not name.isidentifier():
        raise ConfigError(f"judge {judge}: give a function as package.module:function or "
                          "path/to/file.py:function")
    try:
        if where.endswith(".py") or "/" in where:
            path = Path(where).expanduser()
            if not path.is_file():
                raise ConfigError(f"judge {judge}: no such file {where} (relative to the working "
                                  f"directory {Path.cwd()})")
            module = _import_file(str(path.resolve()))
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as e:  # the user's module may raise anything as it runs
        raise ConfigError(f"judge {judge}: cannot import {where} ({type(e).__name__}: "
                          f"{first_line(e)})") from None
    if not hasattr(module, name):
        raise ConfigError(f"judge {judge}: {where} has no attribute {name!r}")
    function = getattr(module, name)
    if not callable(function):
        raise ConfigError(f"judge {judge}: {where}:{name} is a {type(function).__name__}, not "
                          "a function")
    return function


@functools.cache
def _import_file(path: str):
    """The module of the Python file at `path` (absolute), run once per process: the settings'
    check and the judge's loading get the same module."""
    name = f"dpo_judge_{hashlib.sha256(path.encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as `import` does: dataclasses and pickle look classes up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def reward_tokenizer(path: str, trust_remote_code: bool = False):
    """A reward model's tokenizer, padding on the right, checked to render a conversation."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"judge {path}: cannot load it as a reward model (its tokenizer): "
                          f"{first_line(e)}") from None
    if tokenizer.chat_template is None:
        raise ConfigError(f"judge {path}: its tokenizer has no chat template to render the "
                          "conversation with; give a reward model that has one")
    if tokenizer.pad_token is None:  # batches are padded; the padding is masked out
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding: the model reads its score at the last non-pad token of each row.
    tokenizer.padding_side = "right"
    render(path, tokenizer, PROBE, "Hello.")  # a template that cannot render fails now
    return tokenizer


def render(name: str, tokenizer, prompt: list[dict], answer: str) -> str:
    """The conversation `prompt + [answer]` as the judge's chat template writes it."""
    conversation = [*map(expand, prompt), {"role": "assistant", "content": answer}]
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False)
    except (TemplateError, ValueError, TypeError) as e:
        raise ConfigError(f"judge {name}: its tokenizer cannot render the conversation "
                          f"({first_line(e)}); give a reward model whose chat template takes "
                          "user and assistant turns") from None


def check_labels(path: str, config) -> None:
    """ConfigError unless the reward model's config gives one score."""
    if config.num_labels != 1:
        raise ConfigError(f"judge {path}: a reward model gives one score, this one "
                          f"{config.num_labels} labels")


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
