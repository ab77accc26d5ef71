"""The README and the docs pages say only what holds: the code tour's line ranges, every flag,
every file, the defaults and metrics the README lists, and every README command — run by a named
test (CPU) or at least parsed by the loaders train.py and accelerate use (GPU recipes).

Cheap by design: nothing here trains; the commands are run by the tests `RUN_BY` names.
"""
import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from dpo.config.cli import _build_parser, load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
TOUR = ROOT / "docs" / "code-tour.md"


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def flat(s: str) -> str:
    """Whitespace-normalised: a reference that wraps a line reads as one that does not."""
    return " ".join(s.split())


# --- The code tour's line ranges ------------------------------------------------------------

def definitions() -> dict[str, list[tuple[int, int]]]:
    """Line ranges (decorators included) of every function, class and module-level name."""
    found: dict[str, list[tuple[int, int]]] = {}
    for path in [*sorted((ROOT / "dpo").rglob("*.py")), ROOT / "train.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                found.setdefault(node.name, []).append((start, node.end_lineno))
            elif isinstance(node, ast.Assign) and node.col_offset == 0:
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        found.setdefault(target.id, []).append((node.lineno, node.end_lineno))
    return found


# "`name` (lines a–b)", "`name` (`file.py` lines a–b)", "`name` (a–b)", "(`name`, a–b)"
LINE_REF = re.compile(r"`(\w+)`(?:,| \((?:`[^`]+` )?)\s?(?:lines )?(\d+)–(\d+)")
LINE_RANGE = re.compile(r"\b\d+–\d+\b|\blines? \d+")


def line_ref_problems(tour: str, defs: dict) -> list[str]:
    """Each range of `tour` that does not span exactly the definition of the name it follows,
    and each line number that follows no name (it could not be checked)."""
    tour = flat(tour)
    refs = list(LINE_REF.finditer(tour))
    wrong = [f"{m[1]} ({m[2]}–{m[3]}): defined at {defs.get(m[1])}" for m in refs
             if (int(m[2]), int(m[3])) not in defs.get(m[1], [])]
    covered = {i for m in refs for i in range(m.start(2) - len("lines "), m.end(3))}
    loose = [m[0] for m in LINE_RANGE.finditer(tour) if m.start() not in covered]
    return wrong + [f"{n!r} names no definition" for n in loose]


def test_code_tour_line_numbers_point_at_their_definitions():
    """Every "`name` (lines a–b)" of docs/code-tour.md spans exactly the definition of `name`,
    also where the reference wraps a line; no line number stands without its name."""
    tour = text(TOUR)
    assert len(LINE_REF.findall(flat(tour))) > 50
    assert not line_ref_problems(tour, definitions())


def test_the_tour_check_catches_a_wrapped_stale_range():
    defs = {"precompute_for_run": [(64, 81)], "train": [(48, 190)]}
    assert not line_ref_problems("`precompute_for_run`\n(lines 64–81)", defs)
    assert line_ref_problems("`precompute_for_run`\n(lines 10–20)", defs)
    assert line_ref_problems("`precompute_for_run` (`dpo/x.py`\nlines 10–20)", defs)
    assert line_ref_problems("as (`precompute_for_run`,\n10–20) does", defs)
    assert line_ref_problems("`train` (lines 48–190), then the loop (125–181)", defs)


# --- Flags, files and names that the README and the docs pages mention ----------------------

def option_strings(parser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


def train_flags() -> set[str]:
    """train.py's flags; `python -m dpo.evaluate` takes the same (`evaluate_config`)."""
    return option_strings(_build_parser())


def accelerate_flags() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return option_strings(launch_command_parser())


def torchrun_flags() -> set[str]:
    from torch.distributed.run import get_args_parser

    return option_strings(get_args_parser())


def bench_flags() -> dict[str, set[str]]:
    """Each bench script's argparse flags, read from its source (importing would run torch)."""
    found = {}
    for path in sorted((ROOT / "bench").glob("*.py")):
        flags = set()
        for node in ast.walk(ast.parse(text(path))):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
                flags |= {a.value for a in node.args if isinstance(a, ast.Constant)
                          and str(a.value).startswith("--")}
        found[f"bench/{path.name}"] = flags
    return found


# Flags of other tools that the pages mention in prose, and whose they are.
OTHER_FLAGS = {"--signal": "SLURM's sbatch"}
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")
CODE_SPAN = re.compile(r"`([^`]+)`")


def documents() -> dict[str, str]:
    return {path.relative_to(ROOT).as_posix(): text(path) for path in [README, *PAGES]}


def commands(doc: str) -> list[str]:
    """Every command of `doc`: the lines of its bash blocks (continuations joined, `&&` split,
    comments dropped), its indented blocks, and its inline code spans that run something."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", doc, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found += [flat(part.split("  #")[0]) for part in line.split(" && ") if part.strip()]
    starts = ("python ", "accelerate launch", "torchrun ", "ACCELERATE_", "MALLOC_")
    unfenced = re.sub(r"```.*?```", "", doc, flags=re.S)
    for block in re.findall(r"(?m)^(?:    .*\n)+", unfenced):
        if block.strip().startswith(starts):
            found.append(flat(block.replace("\\\n", " ")))
    found += [flat(span) for span in CODE_SPAN.findall(flat(doc)) if span.startswith(starts)]
    return found


def command_flag_problems(command: str) -> list[str]:
    """Flags of a command that its program does not have: before `train.py` or `-m
    dpo.evaluate` accelerate's or torchrun's, after it train.py's; a bench script's its own."""
    words = shlex.split(command)
    words = [w for w in words if not re.match(r"^[A-Z_]+=", w)]  # environment assignments
    if any("<" in w for w in words):  # a pattern such as bench/<script>.py, not a command
        return []
    script = next((i for i, w in enumerate(words) if w in ("train.py", "dpo.evaluate")
                   or w.startswith("bench/")), None)
    if script is None:
        return []
    launcher = {"accelerate": accelerate_flags, "torchrun": torchrun_flags}.get(words[0])
    before = launcher() if launcher else set()
    after = train_flags() if words[script] in ("train.py", "dpo.evaluate") \
        else bench_flags().get(words[script])
    if after is None:
        return [f"{command}: no script {words[script]}"]
    return [f"{command}: {w}" for i, w in enumerate(words) if FLAG.fullmatch(w)
            and w not in (before if i < script else after)]


def test_every_flag_exists_where_the_docs_put_it():
    """In commands, a flag before the script is the launcher's and after it the script's; in
    prose, a kebab-case flag is train.py's (or a bench script's) and a snake_case one is
    accelerate's or torchrun's, never train.py's."""
    train, launch = train_flags(), accelerate_flags() | torchrun_flags()
    benches = set().union(*bench_flags().values())
    assert "--mixed_precision" in launch and not {"--mixed_precision", "--num_processes"} & train
    problems = []
    for name, doc in documents().items():
        for command in commands(doc):
            problems += [f"{name}: {p}" for p in command_flag_problems(command)]
        for flag in set(FLAG.findall(doc)):
            if "_" in flag:
                ok = flag in launch
            else:
                ok = flag in train or flag in benches or flag in OTHER_FLAGS
            if not ok:
                problems.append(f"{name}: {flag} is nobody's flag")
    assert not problems, problems


def test_the_flag_check_tells_launcher_flags_from_train_flags():
    assert command_flag_problems("accelerate launch --num_processes 2 train.py --beta 0.1") == []
    assert command_flag_problems("accelerate launch train.py --num_processes 2")
    assert command_flag_problems("accelerate launch --beta 0.1 train.py")
    assert command_flag_problems("python train.py --mixed_precision bf16")
    assert command_flag_problems("python bench/lora.py --shape tiny")  # bench_train's, not lora's


PATH = re.compile(r"(?<![\w/.-])((?:dpo|tests|configs|bench|docs|\.ci)/[\w/.-]*\w|train\.py|"
                  r"setup\.cfg)(?:::(test_\w+))?")
LINK = re.compile(r"\]\(([^)#\s]+)?(?:#([^)\s]+))?\)")
TEST_NAME = re.compile(r"(?<![\w/])(test_\w+)\b(?!\.)")


def defined_test_names() -> set[str]:
    names = set()
    for path in (ROOT / "tests").glob("*.py"):
        names |= {n.name for n in ast.walk(ast.parse(text(path)))
                  if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return names


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: str) -> set[str]:
    return {slug(h) for h in re.findall(r"(?m)^#+ (.*)$", doc)}


def test_every_file_test_and_link_exists():
    """Each repository path a page names exists (and its `::test_name`, each `test_name` in
    code is a test of tests/), and each relative link reaches a file and its heading."""
    tests, problems = defined_test_names(), []
    for name, doc in documents().items():
        here = (ROOT / name).parent
        body = flat(doc)
        for path, test in PATH.findall(body):
            if not (ROOT / path).exists() and not (here / path).exists():
                problems.append(f"{name}: no file {path}")
            if test and test not in tests:
                problems.append(f"{name}: no test {path}::{test}")
        for span in CODE_SPAN.findall(body):
            problems += [f"{name}: no test {t}" for t in TEST_NAME.findall(span)
                         if t not in tests and not t.startswith("test_readme")]
        for target, anchor in LINK.findall(doc):
            if target.startswith(("http://", "https://")):
                continue
            file = (here / target) if target else ROOT / name
            if not file.exists():
                problems.append(f"{name}: link to missing {target}")
            elif anchor and file.suffix == ".md" and anchor not in anchors(text(file)):
                problems.append(f"{name}: no heading #{anchor} in {target or name}")
    assert not problems, problems


# --- The README's commands: each is run by a test, or at least parsed ----------------------

# A README command -> where it is run: (file::function, a fragment of that function's source
# that runs it). A README edit that changes a command, or a test edit that stops running it,
# fails `test_every_readme_command_is_run_or_parsed`.
CI = (".ci/run", None)
RUN_BY = {
    "pip install torch==2.13.0": [(*CI, "pip install -q torch==2.13.0")],
    'pip install -e ".[plot]"': [(*CI, 'pip install -q -e ".[test,plot]"')],
    'pip install -e ".[test]"': [(*CI, 'pip install -q -e ".[test,plot]"')],
    "python -m pytest -q -rs": [(*CI, "\npython -m pytest -q -rs\n")],
    "python train.py --config configs/demo.yaml": [
        ("tests/e2e.py", "demo_run",
         '"--config", "configs/demo.yaml", "--output-dir", str(out))'),
        ("tests/test_demo.py", "test_demo_teaches_the_rule_to_its_answers", "demo_run()")],
    "python train.py --config configs/online_demo.yaml": [
        ("tests/test_online.py", "run",
         '"--config", "configs/online_demo.yaml", "--output-dir", str(out))'),
        ("tests/test_online.py", "test_the_demo_lifts_acceptance_round_by_round", "run")],
    "python -m dpo.plot outputs/demo": [
        ("tests/test_readme.py", "test_the_quickstart_runs_as_the_readme_shows", '"dpo.plot"')],
    "python -m dpo.evaluate --model outputs/demo": [
        ("tests/test_evaluate.py", "test_output_dir_gives_the_runs_final_eval",
         'evaluate(env, "--model", str(run), "--output-dir", str(tmp_path / "eval"))')],
    "python -m dpo.evaluate --model outputs/demo/checkpoint-125": [
        ("tests/test_evaluate.py", "test_checkpoint_gives_the_runs_eval_at_its_step",
         'evaluate(env, "--model", str(run / "checkpoint-125"), "--output-dir", str(tmp_path))')],
}
# The quick tier: a subset of what CI runs. A test runs it with --collect-only (running its tests
# from a test would run them twice).
QUICK = 'python -m pytest -q -m "not slow and not parallel"'
# Files the README's GPU recipes name as the reader's own.
OWN_FILES = {"my_run.yaml": "model: Qwen/Qwen3-0.6B\ndataset: my_pairs.jsonl\n"}


def source_of(path: str, function: str | None) -> str:
    source = text(ROOT / path)
    if function is None:
        return source
    node = next(n for n in ast.walk(ast.parse(source))
                if isinstance(n, ast.FunctionDef) and n.name == function)
    return ast.get_source_segment(source, node)


def parse_gpu_recipe(command: str, tmp_path: Path):
    """`accelerate launch ... train.py ...`: accelerate's parser takes its part, accelerate's
    config loader its --config_file, and train.py's `load_config` the rest (`--config` too)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    words = shlex.split(command)
    assert words[:2] == ["accelerate", "launch"], command
    args = launch_command_parser().parse_args(words[2:])
    assert args.training_script == "train.py", command
    if args.config_file:
        load_config_from_file(str(ROOT / args.config_file))
    train_args = []
    for word in args.training_script_args:
        if word in OWN_FILES:
            (tmp_path / word).write_text(OWN_FILES[word])
            word = str(tmp_path / word)
        elif word.endswith(".yaml"):
            word = str(ROOT / word)
        train_args.append(word)
    return load_config(train_args)


def test_every_readme_command_is_run_or_parsed(tmp_path):
    found = commands(text(README))
    assert QUICK in found
    run, parsed = [c for c in found if c in RUN_BY], []
    for command in found:
        if command.startswith("accelerate launch"):
            parse_gpu_recipe(command, tmp_path)
            parsed.append(command)
    left = [c for c in found if c not in run and c not in parsed and c != QUICK]
    assert not left, f"README commands no test runs or parses: {left}"
    assert len(parsed) >= 7 and set(RUN_BY) <= set(found), set(RUN_BY) - set(found)
    for command in run:
        for path, function, fragment in RUN_BY[command]:
            assert fragment in source_of(path, function), (command, path, function)
    markers = text(ROOT / "setup.cfg").split("markers =")[1]
    assert {"slow:", "parallel:"} <= set(markers.split())


@pytest.mark.slow  # a pytest subprocess collecting the whole suite
def test_the_quick_tier_selects_tests_that_are_neither_slow_nor_parallel(tmp_path):
    from tests.e2e import demo_env, run_python

    args = shlex.split(QUICK)[1:]  # after `python`
    # Forked from the zygote, whose libraries are imported already: collecting imports them all.
    out = run_python([*args, "--collect-only", "-p", "no:cacheprovider"],
                     demo_env(tmp_path / "cache"), timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    quick = {line for line in out.stdout.splitlines() if "::" in line}
    assert len(quick) > 500, out.stdout[-2000:]
    assert any(line.startswith("tests/test_loss.py::") for line in quick)
    assert not any("test_demo_teaches_the_rule_to_its_answers" in line
                   or "test_two_processes_match_one" in line for line in quick)


def test_the_gpu_recipes_parse_to_the_settings_they_promise(tmp_path):
    recipes = {c: parse_gpu_recipe(c, tmp_path) for c in commands(text(README))
               if c.startswith("accelerate launch")}
    lora = [cfg for cfg in recipes.values() if cfg.lora_r]
    assert lora and all(cfg.dataset == ["my_pairs.jsonl"] for cfg in lora)
    seed_run = next(cfg for c, cfg in recipes.items() if "qwen3_0.6b_stack_exchange" in c)
    assert (seed_run.model, seed_run.num_samples, seed_run.data_dir) == (
        "Qwen/Qwen3-0.6B", 1000, ["data/rl"])


def test_a_command_no_test_runs_fails_the_check(tmp_path, monkeypatch):
    readme = text(README).replace("python -m dpo.plot outputs/demo",
                                  "python -m dpo.plot outputs/demo --dpi 300")
    monkeypatch.setattr(Path, "read_text", lambda self, **kw: readme if self == README
                        else Path.read_bytes(self).decode("utf-8"))
    with pytest.raises(AssertionError, match="no test runs or parses"):
        test_every_readme_command_is_run_or_parsed(tmp_path)


def test_accelerate_config_files_load():
    """Every accelerate config file loads with accelerate's own loader, and every run config
    with train.py's (`load_config`), whether or not a test launches with it."""
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert {p.stem for p in files} >= {"single", "ddp", "zero2", "zero3", "fsdp", "multinode"}
    for path in files:
        assert load_config_from_file(str(path)).num_processes >= 1, path
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(["--config", str(path)])


# --- The README's defaults and metrics -------------------------------------------------------

def test_the_defaults_table_matches_the_config():
    from dpo.config.schema import SECTIONS
    import dataclasses

    defaults = {"--" + f.name.replace("_", "-"): f.metadata["default"]
                for section in SECTIONS for f in dataclasses.fields(section)}
    readme = text(README)
    table = readme[readme.index("## Main defaults"):readme.index("## What a run writes")]
    rows = re.findall(r"(?m)^\| `(--[\w-]+)` \| (.*) \|$", table)
    assert len(rows) >= 15
    for flag, cell in rows:
        shown = cell.split("`")[1] if cell.startswith("`") else cell.split()[0]
        want = defaults[flag]
        want = "none" if want is None else " ".join(map(str, want)) \
            if isinstance(want, list) else str(want)
        assert shown == want, (flag, shown, want)


def expand(keys: str) -> set[str]:
    """`rewards/{chosen,rejected}` -> {"rewards/chosen", "rewards/rejected"}."""
    m = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", keys)
    return {m[1] + part + m[3] for part in m[2].split(",")} if m else {keys}


def logged_keys() -> set[str]:
    """What train.py and the evaluator can write to metrics.jsonl (beyond `step`)."""
    from types import SimpleNamespace

    import torch

    from dpo.train.metrics import PAIR_KEYS, TrainMetrics, log_train

    class Reduce:  # one process
        def reduce(self, tensor, reduction):
            return tensor

    metrics = TrainMetrics(torch.device("cpu"))
    metrics.add_batch(torch.zeros(2, len(PAIR_KEYS)), torch.ones(4, 8))
    metrics.add_grad_norm(1.0)

    class Logger:
        def log(self, step, values):
            self.keys = set(values)

    logger, scheduler = Logger(), SimpleNamespace(get_last_lr=lambda: [1e-4])
    log_train(Reduce(), logger, metrics, scheduler, 1, 0.0, 0.5, 1)  # a skipped step
    train = logger.keys
    judged = set(re.findall(r'results\["(eval/[\w/]+)"\]',
                            text(ROOT / "dpo" / "eval" / "evaluation.py")))
    return train | {f"eval/{k}" for k in PAIR_KEYS} | judged


@pytest.mark.parametrize("page, start, end", [
    ("README.md", "## What a run writes", "## Docs"),
    ("docs/outputs-and-evaluation.md", "## `metrics.jsonl`", "## Curves"),
])
def test_the_metrics_lists_name_every_logged_key(page, start, end):
    doc = text(ROOT / page)
    section = flat(doc[doc.index(start):doc.index(end)])
    named = set().union(*(expand(s) for s in CODE_SPAN.findall(section)))
    named |= {f"eval/{k}" for k in named if "/" in k or k == "loss"}  # "the same keys as eval/…"
    missing = logged_keys() - named
    assert "padding_fraction" in logged_keys() and "eval/win_rate" in logged_keys()
    assert not missing, missing


@pytest.mark.slow
def test_the_quickstart_runs_as_the_readme_shows():
    """The demo's run (shared with tests/test_demo.py) prints the table and the prompts the
    README shows, and `python -m dpo.plot` on it (the README's command, its directory the
    config's output_dir) draws curves.png."""
    import subprocess
    import sys

    from tests.e2e import demo_run

    out, stdout = demo_run()
    readme = text(README)
    command = next(c for c in commands(readme) if c.startswith("python -m dpo.plot"))
    config = yaml.safe_load(text(ROOT / "configs" / "demo.yaml"))
    assert shlex.split(command)[3:] == [config["output_dir"]]
    result = subprocess.run([sys.executable, "-m", "dpo.plot", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = re.search(r"```text\n(held-out pairs.*?)```", readme, re.S)[1]
    printed = stdout[stdout.index("held-out pairs"):]

    def labels(block):  # the table's row names and the prompts, not the numbers
        return [line.split()[0] if not line.startswith("prompt:") else line
                for line in block.splitlines() if line and not line.startswith("  ")]
    assert labels(shown) == labels(printed)
