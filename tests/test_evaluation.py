"""The end-of-run summary and the sample answers sent to the trackers."""
from types import SimpleNamespace

from dpo.eval.evaluation import log_samples, summary


def test_summary_shows_the_judged_answers():
    base = {"eval/loss": 0.1, "eval/rewards/accuracies": 1.0, "eval/rewards/margins": 5.0}
    text = summary({}, {**base, "eval/win_rate": 0.9, "eval/reward/policy": 0.85,
                        "eval/reward/reference": 0.05})
    assert "win_rate            0.9000" in text and "reward/reference    0.0500" in text
    assert "win_rate" not in summary({}, base)


def test_samples_go_to_the_trackers_as_a_table():
    """wandb-like trackers get `log_table`; TensorBoard's writer a markdown table as text."""
    calls = []

    class Table:
        def log_table(self, name, columns, data, step):
            calls.append(("table", name, columns, data, step))

    class Writer:
        def add_text(self, name, text, global_step):
            calls.append(("text", name, text, global_step))

    samples = [{"prompt": "p", "policy": "a", "reward_policy": 1.0}]
    log_samples(SimpleNamespace(trackers=[Table(), SimpleNamespace(writer=Writer())]), 7, samples)
    assert calls[0] == ("table", "eval/samples", ["prompt", "policy", "reward_policy"],
                        [["p", "a", 1.0]], 7)
    assert calls[1] == ("text", "eval/samples",
                        'prompt | policy | reward_policy\n--- | --- | ---\n"p" | "a" | 1.0', 7)
