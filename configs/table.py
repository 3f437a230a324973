"""Print the README's Beauty results table from the `measured` block of every config in this folder.

    python configs/table.py
"""
import json
from pathlib import Path

from record import KEYS as COLS

HERE = Path(__file__).resolve().parent


def rows():
    for f in sorted(HERE.glob("*.json")):
        spec = json.loads(f.read_text())
        yield from _rows(f.stem, spec)
        for seed, run in sorted(spec.get("seed_runs", {}).items()):  # the same config, another train.seed
            yield from _rows(f"{f.stem} --set train.seed={seed}", dict(run, id_order=spec.get("id_order")))


def _rows(name: str, spec: dict):
    m = spec.get("measured")
    if m:
        t = m.get("train_seconds")
        where = f" ({spec['machine']})" if spec.get("machine") else " (shared CPU)" if spec.get("timing_note") else ""
        took = f"{t / 60:.0f} min{where}" if t else "?"
        if m.get("wall_seconds"):  # an ensemble trained as one timed pipeline: t sums its members
            took = f"{m['wall_seconds'] / 60:.0f} min wall-clock ({t / 60:.0f} min summed over members)"
        yield name, spec.get("id_order", "?"), m, took


def fmt(m: dict) -> str:
    return " | ".join(f"{m[c]:.4f}".lstrip("0") for c in COLS)


def main() -> None:
    print("| configuration | item ids | ranking | " + " | ".join(COLS) + " | training (2-core CPU unless named) |")
    print("|---|---|---|" + "---|" * (len(COLS) + 1))
    for name, order, m, t in rows():
        print(f"| `{name}` | {order} | all items | {fmt(m['test'])} | {t} |")
        print(f"| `{name}` | {order} | seen items excluded | {fmt(m['test_exclude_seen'])} | |")


if __name__ == "__main__":
    main()
