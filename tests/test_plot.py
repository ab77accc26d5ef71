"""`python -m dpo.plot <output_dir>`: curves for full, minimal and eval-only runs; clear errors."""
import importlib.util
import json
import subprocess
import sys

import pytest

from dpo import plot

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason='matplotlib is an optional extra: pip install -e ".[plot]" to test the drawing')

PAIR = {"loss": 0.6931, "rewards/chosen": 0.0, "rewards/rejected": 0.0,
        "rewards/accuracies": 0.0, "rewards/margins": 0.0, "logps/chosen": -180.0,
        "logps/rejected": -176.0, "logits/chosen": 0.0, "logits/rejected": 0.0}
TRAIN_EXTRA = {"grad_norm": 3.4, "tokens_per_sec": 1500.0, "lr": 1e-3, "epoch": 0.1}


def train_log(step, loss):
    return {"step": step, **PAIR, "loss": loss, **TRAIN_EXTRA}


def eval_log(step, loss):
    return {"step": step, **{f"eval/{k}": v for k, v in PAIR.items()}, "eval/loss": loss}


def write_metrics(directory, logs):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(log) + "\n" for log in logs))
    return directory


def assert_png(path):
    assert path.name == "curves.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_matplotlib
@pytest.mark.parametrize("logs", [
    pytest.param([eval_log(0, 0.6931), train_log(25, 0.47), train_log(50, 0.41),
                  eval_log(50, 0.40)], id="train-and-eval"),
    pytest.param([train_log(1, 0.6931)], id="one-train-log-no-eval"),
    pytest.param([eval_log(0, 0.6931), eval_log(10, 0.5)], id="eval-only"),
])
def test_plot_writes_curves_png(tmp_path, logs, capsys):
    out = write_metrics(tmp_path / "run", logs)
    assert plot.main([str(out)]) == 0
    assert_png(out / "curves.png")
    assert "curves.png" in capsys.readouterr().out


def test_series_split_train_and_eval():
    """Train and eval logs share a step but not their keys; NaN points are left out."""
    logs = [eval_log(0, 0.69), train_log(25, 0.47), train_log(50, float("nan")),
            eval_log(50, 0.40)]
    assert plot.series(logs, "loss") == ([25], [0.47])
    assert plot.series(logs, "eval/loss") == ([0, 50], [0.69, 0.40])
    assert plot.series(logs, "grad_norm") == ([25, 50], [3.4, 3.4])
    assert plot.series(logs, "eval/grad_norm") == ([], [])


@pytest.mark.parametrize("content, message", [
    (None, "metrics.jsonl not found"),
    ("", "holds no logs"),
    ("\n\n", "holds no logs"),
    ('{"step": 1, "loss": 0.6}\n{"step": 2, "lo', "line 2: not JSON"),
    ('{"loss": 0.6}\n', "line 1: a log must be an object with a 'step'"),
])
def test_bad_metrics_give_one_line_and_exit_1(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert plot.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "curves.png").exists()


def test_without_matplotlib_says_what_to_install(tmp_path, capsys, monkeypatch):
    """A None entry in sys.modules makes `import matplotlib` fail as if it were not installed."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = write_metrics(tmp_path / "run", [train_log(1, 0.69)])
    assert plot.main([str(out)]) == 1
    err = capsys.readouterr().err
    assert 'pip install -e ".[plot]"' in err and err.count("\n") == 1


def test_command_line_exit_code(tmp_path):
    """`python -m dpo.plot` on a directory without metrics exits non-zero with the message."""
    result = subprocess.run([sys.executable, "-m", "dpo.plot", str(tmp_path / "nowhere")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "metrics.jsonl not found" in result.stderr


@needs_matplotlib
def test_win_rate_gets_a_panel_when_judged(tmp_path):
    """A run with a judge logs eval/win_rate: a seventh panel draws it; a run without keeps six."""
    logs = [eval_log(0, 0.6931), train_log(10, 0.5), eval_log(10, 0.4)]
    logs[0]["eval/win_rate"], logs[2]["eval/win_rate"] = 0.5, 0.9
    assert plot.panels_of(logs)[-1] == plot.WIN_RATE_PANEL
    assert plot.panels_of([train_log(1, 0.6)]) == plot.PANELS
    drawn = {}
    real = plot.series

    def spy(logs, key):
        drawn[key] = real(logs, key)
        return drawn[key]

    plot.series = spy
    try:
        assert plot.main([str(write_metrics(tmp_path / "run", logs))]) == 0
    finally:
        plot.series = real
    assert drawn["eval/win_rate"] == ([0, 10], [0.5, 0.9])
    assert_png(tmp_path / "run" / "curves.png")
