"""Training curves of a run: `python -m dpo.plot <output_dir>` writes `<output_dir>/curves.png`.

It reads `<output_dir>/metrics.jsonl` (one JSON object per log, see `dpo.train.metrics`) and draws,
over optimizer steps, the loss, the reward margin, the reward accuracy, the chosen and rejected
rewards, the chosen and rejected log-probs and the gradient norm, and the sample answers' win
rate against the reference when a judge scored them (`--judge`); train logs as solid lines, eval
logs (keys prefixed `eval/`) as dashed ones. Every point gets a marker, so a run with a single log
still shows it. `docs/dpo.md` ("What every logged metric means") says what healthy curves look like.

matplotlib is an optional extra (`pip install -e ".[plot]"`): training never needs it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
INSTALL_HINT = 'matplotlib is not installed: pip install -e ".[plot]" (or pip install matplotlib)'

# (panel title, metric keys drawn in it). Each key is drawn for train and, with `eval/`, for eval.
PANELS = (
    ("loss", ("loss",)),
    ("reward margin  r⁺ − r⁻", ("rewards/margins",)),
    ("reward accuracy  (r⁺ > r⁻)", ("rewards/accuracies",)),
    ("implicit rewards  β·log π/π_ref", ("rewards/chosen", "rewards/rejected")),
    ("summed log-probs  log π(y|x)", ("logps/chosen", "logps/rejected")),
    ("gradient norm (before clipping)", ("grad_norm",)),
)
# Drawn as a seventh panel when the run judged its sample answers (`--judge`): eval only.
WIN_RATE_PANEL = ("win rate vs reference  (ties half)", ("win_rate",))
# Chosen in one colour, rejected in another, in every panel that shows both.
COLOURS = {"chosen": "tab:green", "rejected": "tab:red"}


class PlotError(Exception):
    """A problem with the run's metrics; the message is one line for the user."""


def read_metrics(output_dir: Path) -> list[dict]:
    """The logs of `<output_dir>/metrics.jsonl`, in file order; PlotError if there are none."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"{path} not found: is {output_dir} the output dir of a training run?")
    logs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            log = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlotError(f"{path}, line {number}: not JSON ({e.msg})") from None
        if not isinstance(log, dict) or "step" not in log:
            raise PlotError(f"{path}, line {number}: a log must be an object with a 'step'")
        logs.append(log)
    if not logs:
        raise PlotError(f"{path} holds no logs yet: train for at least one logging step")
    return logs


def series(logs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the logs that carry it; NaN/inf are dropped as unplottable."""
    points = [(log["step"], log[key]) for log in logs
              if isinstance(log.get(key), (int, float)) and math.isfinite(log[key])]
    return [step for step, _ in points], [value for _, value in points]


def panels_of(logs: list[dict]) -> tuple:
    """The panels drawn for these logs: `PANELS`, and the win rate's when it was logged."""
    judged = any("eval/win_rate" in log for log in logs)
    return PANELS + ((WIN_RATE_PANEL,) if judged else ())


def plot_curves(output_dir: Path) -> Path:
    """Draw the curves of the run in `output_dir` into `<output_dir>/curves.png`; return its path.

    Raises PlotError for a missing or empty metrics file, or when matplotlib is not installed.
    """
    logs = read_metrics(output_dir)
    # Imported here, not at module level: matplotlib is an optional extra. Agg renders to a file
    # and needs no display, so this also works on a headless training node.
    try:
        import matplotlib
    except ImportError:
        raise PlotError(INSTALL_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    first, last = min(log["step"] for log in logs), max(log["step"] for log in logs)
    pad = max(0.5, 0.03 * (last - first))  # a single step still gets an axis around it
    panels = panels_of(logs)
    rows = math.ceil(len(panels) / 3)
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4 * rows), constrained_layout=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            side = key.rsplit("/", 1)[-1]
            colour = COLOURS.get(side, "tab:blue")
            label = side if len(keys) > 1 else None
            for prefix, style in (("", "-"), ("eval/", "--")):
                steps, values = series(logs, prefix + key)
                if steps:
                    name = " ".join(filter(None, (prefix.rstrip("/") or "train", label)))
                    ax.plot(steps, values, style, marker="o", markersize=3, color=colour,
                            label=name)
        if keys == ("loss",):  # every run starts here: π = π_ref gives −log σ(0) = ln 2
            ax.axhline(math.log(2), color="grey", linestyle=":", linewidth=1, label="ln 2")
        if keys in (("rewards/accuracies",), ("win_rate",)):
            ax.set_ylim(-0.05, 1.05)
        if keys == ("win_rate",):  # a policy that answers as its reference does
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="0.5")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_xlim(first - pad, last + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"DPO run {Path(output_dir).resolve().name}: solid = train (mean over the "
                 "logging window), dashed = eval (held-out pairs)")
    out = Path(output_dir) / CURVES_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 when the PNG is written, 1 with a one-line error on stderr."""
    parser = argparse.ArgumentParser(prog="python -m dpo.plot", description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", type=Path, help="a training run's --output-dir")
    args = parser.parse_args(argv)
    try:
        out = plot_curves(args.output_dir)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
