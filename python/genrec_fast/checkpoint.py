"""Checkpoints: a directory with config.json, catalog.json, tokenizer.model, weights.pt (+ train_state.pt).

Written to a temporary sibling directory and renamed into place, so a crash never leaves a half
checkpoint; tensors are read back with `torch.load(weights_only=True)`, so loading runs no code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import TrainConfig, model_config_from_dict
from .data import Catalog
from .model import GenRec
from .tokenizer import GenRecTokenizer

FILES = ("config.json", "catalog.json", "tokenizer.model", "weights.pt")
CASCADE = "cascade.json"  # marks a cascade directory (cascade.py): two checkpoints, retriever/ and ranker/
HYBRID = "hybrid.json"  # marks a hybrid directory (hybrid.py): two checkpoints, genrec/ and sasrec/


def is_cascade(path: str | Path) -> bool:
    """Whether `path` is a cascade directory written by `Cascade.save` rather than one model's checkpoint."""
    return (Path(path) / CASCADE).is_file()


def is_hybrid(path: str | Path) -> bool:
    """Whether `path` is a hybrid directory written by `Hybrid.save` (hybrid.py)."""
    return (Path(path) / HYBRID).is_file()


def is_pair(path: str | Path) -> bool:
    """A cascade or a hybrid: two models in one directory, loaded and served alone (never in an ensemble)."""
    return is_cascade(path) or is_hybrid(path)


def read_pair(path: str | Path, name: str, command: str) -> dict:
    """A cascade's or hybrid's settings file `name` (cascade.json, hybrid.json) in `path`; one without its
    candidates and weight is a ValueError naming the file and the `command` that writes it."""
    cfg = read_json(Path(path) / name)
    missing = [key for key in ("candidates", "weight") if key not in cfg]
    if missing:
        raise ValueError(f"{command} {path}: {name} lacks {missing}; the file is damaged (`genrec-fast {command}` "
                         "writes it)")
    return cfg


def save_pair(path: str | Path, name: str, sources: dict, settings: dict) -> Path:
    """A cascade's or hybrid's directory: `settings` as the file `name` and a copy of each checkpoint directory of
    `sources` ({subdirectory: source}) without its train_state.pt, replacing what `path` held (written beside it
    first: `path`'s own subdirectories may be the sources)."""
    path = Path(path)
    tmp = staging_dir(path)
    try:
        for sub, src in sources.items():
            shutil.copytree(src, tmp / sub, ignore=shutil.ignore_patterns("train_state.pt"))
        (tmp / name).write_text(json.dumps(dict(settings, **{f"{sub}_from": str(src) for sub, src in sources.items()}),
                                           indent=2))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save(path: str | Path, model: GenRec, tokenizer: GenRecTokenizer, catalog: Catalog,
         train_cfg: TrainConfig | None = None, train_state: dict | None = None, info: dict | None = None) -> Path:
    path = Path(path)
    tmp = staging_dir(path)
    try:
        cfg = {"model": dataclasses.asdict(model.cfg),
               "train": dataclasses.asdict(train_cfg) if train_cfg else None, "info": info or {}}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "catalog.json").write_text(json.dumps(catalog.to_dict()))
        tokenizer.save(tmp)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "weights.pt")
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def staging_dir(path: Path) -> Path:
    """A new empty directory beside `path` to write its replacement into (`replace_dir`), with the permissions a
    plain mkdir would give (the umask's, not mkdtemp's 0700: a checkpoint trained by one account is served by
    another)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def replace_dir(src: Path, dst: Path) -> None:
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_checkpoint(path: str | Path) -> Path:
    """`path` as a Path if it holds every file of `FILES`, else a FileNotFoundError (missing path, a file, a run
    directory whose checkpoint is `best/`, a checkpoint missing files) or a ValueError (a SASRec checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such directory")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path}: a file, expected a checkpoint directory (e.g. runs/NAME/best)")
    if (path / "sasrec.json").is_file():
        raise ValueError(f"checkpoint {path}: a SASRec model (`train --model sasrec`), the peer baseline: "
                         "`genrec-fast evaluate` and `report` score it; load, recommend and serve take GenRec checkpoints")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing and (path / "best" / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {path}: a run directory; its checkpoint is {path / 'best'}")
    if missing:
        raise FileNotFoundError(f"checkpoint {path}: missing {', '.join(missing)}")
    return path


def load_parts(path: str | Path, device: str | torch.device = "cpu"):
    """-> (model in eval mode, tokenizer, catalog, train config or None, config dict)."""
    path = check_checkpoint(path)
    cfg = read_json(path / "config.json")
    catalog = Catalog(**read_json(path / "catalog.json"))
    tokenizer = GenRecTokenizer.load(path, catalog.item_codes)
    with torch.device("meta"):  # no random init (1-2 s at a million items), no second copy: the weights replace it
        model = GenRec(model_config_from_dict(cfg["model"]))
    try:
        weights = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file raises anything from pickle to zip errors
        first = (str(e).strip().splitlines() or [""])[0]  # (torch's own messages run to a page)
        raise ValueError(f"checkpoint {path}: weights.pt cannot be read ({type(e).__name__}: {first}); "
                         "it is damaged or not a genrec_fast checkpoint") from e
    model.load_state_dict(weights, assign=True)
    train_cfg = _train_config(path, cfg.get("train"))
    return model.to(device).eval(), tokenizer, catalog, train_cfg, cfg


def _train_config(path: Path, d: dict | None) -> TrainConfig | None:
    """config.json's train section as a TrainConfig (None where it has none); unknown keys are a ValueError."""
    if not d:
        return None
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"checkpoint {path}: config.json's train section has unknown keys {unknown} (written by a "
                         "newer genrec_fast?)")
    return TrainConfig(**d)


def read_json(file: Path):
    """A JSON file of a checkpoint, cascade or run directory; a damaged one is a ValueError naming it."""
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {file.parent}: {file.name} is not valid JSON ({e}); the file is "
                         "damaged") from None


def load_train_state(path: str | Path) -> dict | None:
    f = Path(path) / "train_state.pt"
    return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None

