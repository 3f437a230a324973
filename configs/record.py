"""Copy a run's measured numbers into its config file (so configs never carry hand-typed metrics).

    python configs/record.py configs/beauty-whole-small.json runs/beauty-whole-small/metrics.json
    python configs/record.py configs/beauty-whole-small.json docs/results/beauty-whole-small-metrics.json
"""
import json
import sys
from pathlib import Path

KEYS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20")
ROWS = {"test": ("test", "genrec"), "test_exclude_seen": ("test", "genrec+exclude_seen"),
        "test_no_user_token": ("test", "genrec(no user token)"), "valid": ("valid", "genrec"),
        "test_popularity": ("test", "popularity"), "test_id_leak": ("test", "id_leak")}


def record(config: Path, metrics: Path) -> dict:
    spec, rep = json.loads(config.read_text()), json.loads(metrics.read_text())
    measured = {name: {k: round(rep[part][row][k], 4) for k in KEYS} for name, (part, row) in ROWS.items()}
    measured["train_seconds"] = rep.get("train_seconds")
    log = metrics.with_name(metrics.name.replace("metrics.json", "log.jsonl"))  # run dir or docs/results
    if log.is_file():
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        measured["epochs_run"] = sum("loss" in r for r in rows)  # not a cut run's final validation row
        measured["best_epoch"] = max((r for r in rows if "valid" in r), key=lambda r: r["valid"]["NDCG@10"])["epoch"]
    spec["measured"] = measured
    config.write_text(json.dumps(spec, indent=2) + "\n")
    return measured


if __name__ == "__main__":
    print(json.dumps(record(Path(sys.argv[1]), Path(sys.argv[2])), indent=2))
