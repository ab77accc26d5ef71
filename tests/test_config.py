"""TrainConfig: the seed's defaults, YAML + flags, and one clear error per bad value."""
import dataclasses
import subprocess
import sys

import pytest

from dpo.config import ConfigError, TrainConfig, load_config
from tests.conftest import ROOT
from tests.e2e import demo_env, run_python


def test_seed_defaults():
    """The TRL seed script's CLI defaults are kept."""
    cfg = load_config([])
    assert (cfg.model, cfg.num_samples, cfg.epochs, cfg.batch_size) == ("Qwen/Qwen3-0.6B", 1000,
                                                                          1, 2)
    assert (cfg.gradient_accumulation_steps, cfg.learning_rate, cfg.beta) == (4, 5e-6, 0.1)
    assert cfg.output_dir == "outputs/dpo_qwen_trl" and cfg.logging_steps == 10
    assert cfg.dataset == ["lvwerra/stack-exchange-paired"] and cfg.max_grad_norm == 1.0


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 1\nlearning_rate: 1.0e-4\nmax_steps: 7\ngroup_by_length: false\n")
    cfg = load_config(["--config", str(path), "--beta", "0.25", "--max-steps", "none"])
    assert cfg.beta == 0.25 and cfg.learning_rate == 1e-4
    assert cfg.max_steps is None and cfg.group_by_length is False


def test_yaml_int_for_a_float_field_becomes_float(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 1\n")
    assert isinstance(load_config(["--config", str(path)]).beta, float)


def test_every_field_has_a_flag_and_the_yaml_round_trips(tmp_path):
    cfg = load_config(["--gradient-checkpointing", "--loss-type", "ipo"])
    cfg.to_yaml(tmp_path / "c.yaml")
    assert load_config(["--config", str(tmp_path / "c.yaml")]) == cfg
    out = run_python(["train.py", "--help"], demo_env(tmp_path / "cache"))
    assert out.returncode == 0, out.stderr
    help_text = out.stdout
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in help_text


@pytest.mark.parametrize("yaml_text, message", [
    ("betta: 0.1\n", "unknown key 'betta'; did you mean 'beta'"),
    ("beta: high\n", "beta must be a float"),
    ("batch_size: 2.5\n", "batch_size must be a int"),
    ("gradient_checkpointing: 1\n", "gradient_checkpointing must be a bool"),
    ("model: null\n", "model must be set"),
    ("- beta\n", "expected a mapping"),
    ("beta: [\n", "not valid YAML"),
])
def test_bad_yaml_names_the_key(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(["--config", str(path)])


@pytest.mark.parametrize("flags, message", [
    (["--beta", "0"], "beta must be a finite number > 0"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--loss-type", "kto_pair"], "loss_type: 'kto_pair' is not one of"),
    # KTO: unpaired rows, so nothing that reads a pair, and a KL estimate needs 2 rows a batch
    (["--loss-type", "kto", "--batch-size", "1"], "batch_size 1: KTO estimates its KL term"),
    (["--loss-type", "kto", "--eval-batch-size", "1"], "eval_batch_size 1: KTO estimates"),
    (["--loss-type", "kto", "sigmoid"], "sigmoid on pairs: it stands alone"),
    (["--loss-type", "kto", "--precompute-ref-logps"], "change with every batch"),
    (["--loss-type", "kto", "--use-weighting"], "WPO weights pairs"),
    (["--loss-type", "kto", "--ld-alpha", "0.5"], "LD-DPO shortens a pair's longer response"),
    (["--loss-type", "kto", "--undesirable-weight", "0"], "undesirable_weight must be finite"),
    (["--desirable-weight", "1.5"], "desirable_weight weighs KTO's classes, not loss_type"),
    # Rankings train with sigmoid alone (the data's own refusals: tests/test_train.py)
    (["--ranking-loss", "all_pairs", "--loss-type", "ipo"],
     "ranking_loss all_pairs: rankings train with loss_type sigmoid alone, not ipo"),
    (["--ranking-loss", "listmle"], "ranking_loss: 'listmle' is not one of"),
    (["--max-responses", "1"], "max_responses must be >= 2, got 1"),
    (["--loss-type", "hinge", "--label-smoothing", "0.1"], "label_smoothing"),
    (["--lr-scheduler", "wavy"], "lr_scheduler: 'wavy' is not one of"),
    (["--warmup-ratio", "1"], "warmup_ratio must lie in"),
    (["--max-length", "64", "--max-prompt-length", "64"], "max_prompt_length"),
    (["--data-format", "csv"], "data_format: 'csv' is not one of"),
    (["--chat-template", "chatml"], "chat_template: 'chatml' is not one of auto, none, plain"),
    (["--prompt-template", "Q: {prompt}"], "prompt_template applies to chat_template none"),
    (["--chat-template", "none", "--prompt-template", "Q: "], "has no {prompt}"),
    (["--chat-template", "none", "--prompt-template", "Q: {q}"], "only {prompt}, found {q}"),
    (["--chat-template", "none", "--use-chat-template"],
     "use_chat_template true means chat_template auto, but chat_template is none"),
    (["--chat-template", "auto", "--no-use-chat-template"],
     "use_chat_template false means chat_template plain, but chat_template is auto"),
    (["--learning-rate=-1e-5"], "learning_rate must be > 0"),
    (["--config", "no/such.yaml"], "no such file"),
    # Loss combinations that make no sense (dpo.loss)
    (["--loss-type", "simpo", "--precompute-ref-logps"], "simpo is reference-free"),
    (["--loss-type", "sft", "--precompute-ref-logps"], "sft is reference-free"),
    (["--loss-type", "sigmoid", "sft", "--loss-weights", "1"], "loss_weights: 1 weights for 2"),
    (["--loss-weights", "1", "2"], "loss_weights: 2 weights for 1"),
    (["--loss-type", "sigmoid", "sigmoid"], "lists a type twice"),
    (["--loss-type", "exo_pair", "--label-smoothing", "0"], r"exo_pair.*must lie in \(0.0"),
    (["--loss-type", "nca_pair", "--label-smoothing", "0.1"], "nca_pair has none"),
    (["--bco-baseline", "none"], "bco_baseline is the baseline of loss_type bco_pair"),
    (["--discopop-tau", "0.1"], "discopop_tau is the temperature of loss_type discopop"),
    (["--loss-type", "discopop", "--discopop-tau", "0"], "discopop_tau must be a finite"),
    (["--loss-type", "sigmoid", "sft", "--rpo-alpha", "0.5"], "has it already"),
    (["--rpo-alpha=-1"], "rpo_alpha must be >= 0"),
    (["--loss-type", "ipo", "--f-divergence-type", "js_divergence"],
     "loss_type ipo divides each response's score by its length"),
    (["--loss-type", "nca_pair", "--f-divergence-type", "forward_kl"],
     "loss_type nca_pair puts a term on each response's own log-ratio"),
    (["--loss-type", "sft", "--f-divergence-type", "forward_kl"],
     "loss_type sft reads no scores, so the divergence would change nothing"),
    (["--f-alpha-divergence-coef", "0.3"], "f_alpha_divergence_coef is the α of"),
    (["--f-divergence-type", "alpha_divergence", "--f-alpha-divergence-coef", "0"],
     "f_alpha_divergence_coef must be a finite number > 0"),
    (["--f-divergence-type", "kl"], "f_divergence_type: 'kl' is not one of"),
    (["--ref-model-sync-steps", "8"], "ref_model_sync_steps sets TR-DPO's reference updates"),
    (["--sync-ref-model", "--loss-type", "simpo"], "uses no reference to update"),
    (["--sync-ref-model", "--precompute-ref-logps"], "would go stale"),
    (["--sync-ref-model", "--ref-model-mixup-alpha", "1.5"], r"must lie in \(0, 1\]"),
    (["--sync-ref-model", "--lora-r", "4"], "sync_ref_model: with LoRA the reference is the policy"),
    (["--padding-free", "--max-length", "1024", "--padding-free-max-tokens", "1000"],
     r"padding_free_max_tokens \(1000\) must be >= max_length \(1024\)"),
])
def test_bad_values_raise_config_error(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config(flags)


@pytest.mark.slow  # 3 runs of train.py; test_bad_values_raise_config_error is the in-process part
def test_bad_flag_is_one_line_and_nonzero_exit(tmp_path):
    """Before any model loads: one line on stderr, no traceback, exit code != 0. The first run
    starts a fresh interpreter (nothing an import prints slips through), the others fork."""
    for i, flags in enumerate((["--batch-size", "two"], ["--beta", "-1"], ["--no-such-flag"])):
        args = ["train.py", *flags, "--output-dir", str(tmp_path / "o")]
        out = (subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
               if i == 0 else run_python(args, demo_env(tmp_path / "cache")))
        assert out.returncode != 0
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0], out.stderr
        assert not (tmp_path / "o").exists()


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)


@pytest.mark.parametrize("flags, yaml_text, expected", [
    (["--use-chat-template"], "", "auto"),
    (["--no-use-chat-template"], "", "plain"),
    (["--no-use-chat-template", "--chat-template", "plain"], "", "plain"),
    ([], "use_chat_template: false\n", "plain"),
    ([], "use_chat_template: true\nchat_template: auto\n", "auto"),
    (["--chat-template", "none"], "use_chat_template: false\n", "none"),  # flags override
    (["--use-chat-template"], "chat_template: none\n", "auto"),
    ([], "", "auto"),
])
def test_use_chat_template_is_an_alias(tmp_path, flags, yaml_text, expected):
    """The old flag and YAML key still work: true/false mean chat_template auto/plain."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    assert load_config(["--config", str(path), *flags]).chat_template == expected


@pytest.mark.parametrize("yaml_text, message", [
    ("use_chat_template: true\nchat_template: plain\n", "but chat_template is plain"),
    ("use_chat_template: maybe\n", "use_chat_template must be true or false"),
])
def test_contradicting_alias_in_yaml_is_one_error(tmp_path, yaml_text, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=f"--config {path}: .*{message}"):
        load_config(["--config", str(path)])


def test_prompt_template_reads_backslash_escapes_as_a_shell_passes_them(tmp_path):
    """`--prompt-template "Question: {prompt}\\n\\nAnswer: "` in bash arrives with a
    backslash and an n; a YAML double-quoted string arrives with real newlines: both mean the
    same template, which survives the saved YAML."""
    cfg = load_config(["--chat-template", "none",
                       "--prompt-template", "Question: {prompt}\\n\\nAnswer: "])
    assert cfg.prompt_template == "Question: {prompt}\n\nAnswer: "
    path = tmp_path / "run.yaml"
    path.write_text('chat_template: none\nprompt_template: "Question: {prompt}\\n\\nAnswer: "\n')
    assert load_config(["--config", str(path)]) == cfg
    cfg.to_yaml(tmp_path / "saved.yaml")
    assert load_config(["--config", str(tmp_path / "saved.yaml")]) == cfg


def test_loss_mixtures_and_the_rpo_alias():
    """`--loss-type a b --loss-weights x y` is a mixture; `--rpo-alpha α` means `sft` at weight α
    beside the given types (and is spent, so the saved config reloads to the same run)."""
    cfg = load_config(["--loss-type", "sigmoid", "bco_pair", "sft", "--loss-weights", "0.8",
                       "0.2", "1"])
    assert cfg.loss_type == ["sigmoid", "bco_pair", "sft"] and cfg.loss_weights == [0.8, 0.2, 1.0]
    cfg = load_config(["--loss-type", "ipo", "--rpo-alpha", "0.5"])
    assert (cfg.loss_type, cfg.loss_weights, cfg.rpo_alpha) == (["ipo", "sft"], [1.0, 0.5], 0.0)
    assert TrainConfig(**{**vars(cfg)}).loss_type == ["ipo", "sft"]
    assert load_config(["--loss-type", "sft"]).loss_type == ["sft"]  # SFT alone, no reference
    assert load_config(["--loss-type", "exo_pair"]).label_smoothing is None  # its 1e-3


def test_an_old_checkpoint_with_rpo_alpha_resumes_as_the_mixture(tmp_path):
    import json

    from dpo.train.checkpoint import STATE_FILE, check_resume, trainer_state

    cfg = TrainConfig(rpo_alpha=0.5, output_dir=str(tmp_path))
    state = trainer_state(cfg, 1, step=2)
    state["config"].update(loss_type="sigmoid", loss_weights=None, rpo_alpha=0.5)
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    assert check_resume(tmp_path, cfg, 1) == []


def test_list_fields_from_flags_and_yaml(tmp_path):
    """A `list[str] | None` field: `--flag a b` (nargs), a YAML list, `none` for null; the YAML
    written by a run reads back the same."""
    cfg = load_config(["--lora-r", "4", "--lora-target-modules", "q_proj", "v_proj"])
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    path = tmp_path / "run.yaml"
    path.write_text("lora_r: 4\nlora_modules_to_save: [embed_tokens]\n"
                    "lora_target_modules: [q_proj]\n")
    cfg = load_config(["--config", str(path), "--lora-target-modules", "none"])
    assert cfg.lora_modules_to_save == ["embed_tokens"] and cfg.lora_target_modules is None
    cfg.to_yaml(tmp_path / "again.yaml")
    assert load_config(["--config", str(tmp_path / "again.yaml")]) == cfg


@pytest.mark.parametrize("yaml_value, message", [
    ("[q_proj, 3]", "lora_target_modules must be a str, got 3"),
    ("[]", "lora_target_modules: the list is empty; give at least one value"),
])
def test_list_fields_check_their_elements(tmp_path, yaml_value, message):
    path = tmp_path / "run.yaml"
    path.write_text(f"lora_r: 4\nlora_target_modules: {yaml_value}\n")
    with pytest.raises(ConfigError) as error:
        load_config(["--config", str(path)])
    assert str(error.value) == message


def test_help_lists_the_flags_section_by_section():
    """`--help` prints one group per section of TrainConfig, each with its own fields' flags,
    and every field belongs to exactly one section."""
    from dpo.config import SECTIONS, _build_parser

    fields = [f.name for section in SECTIONS for f in dataclasses.fields(section)]
    assert fields == [f.name for f in dataclasses.fields(TrainConfig)]
    help_text = _build_parser().format_help()
    titles = [section.__doc__.partition(":")[0] for section in SECTIONS]
    assert titles[:2] == ["model", "data"] and len(titles) == 7
    starts = [help_text.index(f"\n{title}:\n") for title in titles] + [len(help_text)]
    for section, start, end in zip(SECTIONS, starts, starts[1:]):
        group = help_text[start:end]
        flags = {word.rstrip(",") for word in group.split() if word.startswith("--")}
        own = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(section)}
        assert own <= flags, f"{section.__name__} lacks {own - flags} in --help"


def test_config_imports_only_from_layers_below():
    """The config is validated before anything loads: it imports from dpo.data, dpo.loss and
    itself only, never from the model, training or eval code (no import circle with them)."""
    import ast

    paths = sorted((ROOT / "dpo" / "config").glob("*.py"))
    assert paths
    allowed = ("dpo.config", "dpo.data", "dpo.loss", "dpo.paths")
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module
                     else [])
            for name in names:
                if name.split(".")[0] == "dpo":
                    assert ".".join(name.split(".")[:2]) in allowed, f"{path.name} imports {name}"


@pytest.mark.parametrize("flags, expected", [
    (["--freeze-vision-tower", "false"], False), (["--freeze-vision-tower=False"], False),
    (["--freeze-vision-tower", "true", "--beta", "0.2"], True),
    (["--no-freeze-vision-tower"], False), (["--freeze-vision-tower", "--beta", "0.2"], True)])
def test_a_boolean_flag_takes_true_or_false_as_transformers_spells_it(flags, expected):
    assert load_config(flags).freeze_vision_tower is expected
    # the word after a flag is consumed only when it is a boolean
    assert load_config(["--padding-free", "--share-prompt", "false"]).share_prompt is False


@pytest.mark.parametrize("flags", [["--padding-free", "maybe"], ["--padding-free=maybe"],
                                   ["--no-padding-free=true"]])
def test_a_boolean_flag_with_another_word_is_refused(flags, capsys):
    with pytest.raises(SystemExit):
        load_config(flags)
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
