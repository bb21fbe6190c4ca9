"""Validation curves of an ``isbi_partial.py`` run as a PNG (needs matplotlib: ``pip install -e .[experiment]``).

python benchmarks/plot_curves.py benchmarks/results/isbi_partial.json docs/isbi_curves.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    src = Path(argv[0]) if argv else Path(__file__).parent / "results" / "isbi_partial.json"
    dst = Path(argv[1]) if len(argv) > 1 else Path("isbi_curves.png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(src.read_text())
    tasks = data["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, (task, row) in zip(axes[0], tasks.items()):
        for key, info in row.items():
            if not key.startswith("model_"):
                continue
            c = info["curve"]
            # Iterations -> seconds, so that models of different cost compare at equal time.
            per_it = info["train_s"] / max(info["iterations"], 1)
            t = [i * per_it / 60 for i in c["val_iteration"]]
            (line,) = ax.plot(t, c["smoothed"], label=f"T={info['steps']} smoothed validation mIoU")
            ax.plot(t, c["val_score"], color=line.get_color(), alpha=0.3, lw=0.8)
            ax.axhline(
                info["miou"],
                color=line.get_color(),
                ls="--",
                lw=1,
                label=f"T={info['steps']} test mIoU {info['miou']:.3f}",
            )
        if "rf" in row:
            ax.axhline(row["rf"]["miou"], color="k", ls=":", label=f"random forest test mIoU {row['rf']['miou']:.3f}")
        ax.set_title(f"ISBI 2012, {task}, {data['patches']} partially annotated patches")
        ax.set_xlabel("training time on 2-core CPU (min)")
        ax.set_ylabel("mIoU")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst, dpi=90)
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
