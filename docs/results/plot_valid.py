"""Plot validation NDCG@10 over training for the Beauty runs in this folder.

    python docs/results/plot_valid.py     # -> docs/results/beauty-valid-ndcg10.png

Reads each `<run>-log.jsonl` (copied from a run directory's `log.jsonl`); validation there is on a
fixed sample of users (`eval_users`: 2,000, or 6,000 for the runs whose config says so; the 2,000
are the first of the 6,000; runs with another training seed sample other users), so the curves are
noisier than the full-user table. Runs validated with seen items excluded (`train.mask_seen`) are
dashed: their scale is higher by construction.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(out: Path = HERE / "beauty-valid-ndcg10.png") -> Path:
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for i, log in enumerate(sorted(HERE.glob("*-log.jsonl"))):
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        ev = [r for r in rows if "valid" in r]
        excluded = any(r["valid"].get("exclude_seen") for r in ev)
        ax.plot([r["epoch"] for r in ev], [r["valid"]["NDCG@10"] for r in ev], marker="os^"[i % 3],
                markersize=4, color=plt.cm.tab20(i % 20), linestyle="--" if excluded else "-",
                label=log.name.removesuffix("-log.jsonl") + (" (seen items excluded)" if excluded else "")
                + (" (H100, time-capped)" if log.name.startswith("beauty-base-gpu-lr3e-4")
                   else " (H100)" if log.name.startswith("beauty-base-gpu") else ""))
    ax.set(xlabel="epoch (pretraining epochs first, then finetuning)", ylabel="validation NDCG@10 (2,000 or 6,000 sampled users)",
           title="GenRec on Amazon Beauty (item ids random unless named original)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(*(Path(a) for a in sys.argv[1:])))
