"""The training history for people to read: metrics.csv and curves.png."""
import os

from evaluation.reports import write_csv
from runtime.atomic import atomic_path


def write_history(run_dir, history):
    """metrics.csv and curves.png of a run from its history rows (one per epoch)."""
    write_csv(os.path.join(run_dir, "metrics.csv"), history)
    plot_curves(os.path.join(run_dir, "curves.png"), history)


def plot_curves(path, rows):
    """Loss (train, and validation when there is one) and validation Dice per region over epochs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        if key in rows[0]:
            ax_loss.plot(epochs, [r[key] for r in rows], label=label)
    ax_loss.set(xlabel="epoch", ylabel="Dice + BCE loss", title="Loss")
    for key in [k for k in rows[0] if k.startswith("val_dice_")]:
        ax_dice.plot(epochs, [r[key] for r in rows], label=key[len("val_dice_"):])
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="Validation Dice", ylim=(0, 1))
    for ax in (ax_loss, ax_dice):
        if ax.lines:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
