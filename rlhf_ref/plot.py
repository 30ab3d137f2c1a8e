"""Plot a run's training curves to a PNG (matplotlib, optional, imported lazily).

One figure, one panel per stage found in ``<run>/metrics/``:

- pretrain:  the next-token cross-entropy (nats/token);
- reward:    the Bradley–Terry loss and pairwise accuracy (train, and held-out when logged);
- rl:        the **true** reward (the hidden preference of the simulated annotator) beside the
             **learned** reward (the reward model), each as its mean per batch; and the KL to π_ref
             per sequence. The learned reward climbing while the true one stalls or falls is
             reward over-optimisation (Goodhart): the reason the two are drawn together.

    plot_run(run_dir, out=None) -> path of the PNG, or None when matplotlib is not installed
"""

from __future__ import annotations

import os

from .metrics import read_metrics

__all__ = ["plot_run", "matplotlib_available"]

STAGES = ("pretrain", "reward", "rl")


def matplotlib_available():
    """None when matplotlib can be imported, else the reason it cannot."""
    try:
        import matplotlib  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"matplotlib not available ({type(e).__name__}: {e})"
    return None


def _series(rows, key):
    xs = [r["step"] for r in rows if r.get(key) is not None]
    ys = [r[key] for r in rows if r.get(key) is not None]
    return xs, ys


def plot_run(run_dir, out=None):
    """Draw every stage's curves from ``run_dir/metrics/*.jsonl`` into one PNG; returns its path."""
    if matplotlib_available() is not None:
        return None
    import matplotlib
    matplotlib.use("Agg", force=False)      # no display needed
    import matplotlib.pyplot as plt

    mdir = os.path.join(run_dir, "metrics")
    data = {s: read_metrics(os.path.join(mdir, f"{s}.jsonl")) for s in STAGES
            if os.path.exists(os.path.join(mdir, f"{s}.jsonl"))}
    panels = [s for s in STAGES if data.get(s)]
    if not panels:
        raise ValueError(f"no metrics to plot in {mdir}")
    out = os.path.join(run_dir, "curves.png") if out is None else out
    ncols = len(panels) + (1 if "rl" in panels else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.4), squeeze=False)
    axes = list(axes[0])
    for stage in panels:
        rows = data[stage]
        ax = axes.pop(0)
        if stage == "pretrain":
            ax.plot(*_series(rows, "loss"), label="train", lw=1)
            x, y = _series(rows, "heldout_loss")
            if x:
                ax.plot(x, y, "o-", label="held-out", ms=3)
            ax.set_title("pretraining: cross-entropy")
            ax.set_ylabel("nats / token")
        elif stage == "reward":
            ax.plot(*_series(rows, "loss"), label="BT loss (train)", lw=1)
            ax.plot(*_series(rows, "accuracy"), label="accuracy (train batch)", lw=1, alpha=0.6)
            x, y = _series(rows, "heldout_accuracy")
            if x:
                ax.plot(x, y, "o-", label="accuracy (held-out)", ms=3)
            ax.axhline(0.5, color="gray", lw=0.5, ls=":")
            ax.set_title("reward model")
        else:
            x, y = _series(rows, "true_reward")
            ax.plot(x, y, label="true reward (hidden)", color="C3")
            ax.set_ylabel("true reward", color="C3")
            ax2 = ax.twinx()
            ax2.plot(*_series(rows, "rm_reward"), label="learned reward (RM)", color="C0", alpha=0.8)
            ax2.set_ylabel("reward-model reward", color="C0")
            ax.set_title("RL: true vs learned reward")
            lines = ax.get_lines() + ax2.get_lines()
            ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="lower right")
            ax.set_xlabel("iteration")
            ax = axes.pop(0)
            ax.plot(*_series(rows, "kl_per_sequence"), label="KL(π‖π_ref) per sequence (k1)", color="C2")
            ax.set_title("RL: KL to π_ref")
            ax.set_ylabel("nats / sequence")
        ax.set_xlabel("iteration")
        if stage != "rl":
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
