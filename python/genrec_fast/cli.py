"""`genrec-fast`: train (and evaluate), evaluate or report a checkpoint, calibrate its biases, build a cascade or a hybrid,
recommend from histories, serve over HTTP."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import shutil
import sys
import time
import warnings
from pathlib import Path

from . import data as data_mod
from .config import load_config, parse_override, with_overrides
from .data import FORMATS, ID_ORDERS, leave_one_out
from .device import check_device
from .item_topk import PRECISIONS

PRECISION_HELP = ("one-token models' head: bfloat16 scans the table in bfloat16 on CPUs with AVX512-BF16 from 131,072 "
                  "items (the same items, scores within a small per-user shift; else float32); default: "
                  "$GENREC_HEAD_PRECISION or float32")


def int_in(low: int, high: int | None = None, what: str = ""):
    """argparse type: an integer in [low, high] (high None: no upper end)."""
    what = what or ("a positive integer" if low == 1 and high is None else f"an integer >= {low}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int, non_negative_int, port = int_in(1), int_in(0), int_in(1, 65535, "a port number from 1 to 65535")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--data", required=required, help="data file or directory (default: the synthetic dataset)")
    p.add_argument("--format", default="p5", choices=FORMATS,
                   help="p5 (default: a line per user, 'user item item ...', oldest first), movielens (u.data or "
                        "ratings.dat), csv / tsv (a header naming user, item and timestamp columns), parquet (user, "
                        "item and timestamp columns)")
    p.add_argument("--columns", metavar="USER,ITEM,TIME", help="csv / tsv / parquet: the user, item and timestamp "
                                                                "columns' names (default user,item,timestamp)")
    p.add_argument("--id-order", default="random", choices=ID_ORDERS, help="item id order (default random)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random --id-order (default %(default)s; the "
                                                       "training run's, to read its data again); not the training "
                                                       "seed (--set train.seed=S)")


def load_data(args) -> data_mod.SequenceData:
    if args.data is None:
        return data_mod.synthetic(id_order=args.id_order, seed=args.seed)
    columns = {}
    if args.columns:
        names = [c.strip() for c in args.columns.split(",")]
        if args.format not in ("csv", "tsv", "parquet") or len(names) != 3 or not all(names):
            raise ValueError(f"--columns: expected USER,ITEM,TIME (three names) with --format csv, tsv or parquet, "
                             f"got {args.columns!r} with --format {args.format}")
        columns = dict(zip(("user_col", "item_col", "time_col"), names))
    try:
        return data_mod.load(args.data, args.format, id_order=args.id_order, seed=args.seed, **columns)
    except data_mod.DataFormatError as e:
        raise _with_format_hint(e, args.format) from None


FORMAT_NAMES = {"csv": "a CSV", "tsv": "a TSV", "parquet": "a Parquet", "movielens": "a MovieLens"}


def _with_format_hint(e: data_mod.DataFormatError, fmt: str) -> data_mod.DataFormatError:
    """A P5 parse error of a file that looks like another format (`data.guess_format`), with a hint naming --format
    (e unchanged otherwise)."""
    guess = data_mod.guess_format(e.path) if fmt == "p5" else None
    if guess is None:
        return e
    return data_mod.DataFormatError(e.path, e.line, f"{e.problem}; read as P5 (the default --format): is it "
                                                    f"{FORMAT_NAMES[guess]} file? pass --format {guess}")


def cmd_train(args) -> int:
    """Train and report; under torchrun every process trains its share and rank 0 alone prints and reports."""
    from .distributed import env_rank
    from .evaluate import format_table, report
    from .train import train
    if args.model == "sasrec":
        return cmd_train_sasrec(args)
    flags = {f"train.{name}": getattr(args, name) for name in ("pretrain_epochs", "finetune_epochs", "batch_size",
                                                                "lr", "eval_users", "threads", "drop_user_prob")}
    flags["model.dropout"] = args.dropout
    overrides = dict(parse_override(x) for x in args.set)
    overrides.update({k: v for k, v in flags.items() if v is not None})  # explicit flags win over --set
    p = with_overrides(load_config(args.config or "recommended"), overrides)
    main_rank = env_rank() == 0
    out = run_dir(args, Path(args.config or "recommended").stem)
    data = load_data(args)
    if main_rank:
        print(data.summary(), flush=True)
    t0 = time.perf_counter()
    with replacing_run(out, args.overwrite and main_rank):
        rec = train(data, out, p, device=args.device, resume=args.resume, progress=not args.quiet,
                    overwrite=args.overwrite)
    train_s = time.perf_counter() - t0
    if not main_rank:  # rank 0 wrote the checkpoints and reports them
        return 0
    if args.no_report:
        print(f"trained in {train_s:.0f} s; checkpoint {out / 'best'}; curves {out / 'curves.png'}; no report "
              f"(--no-report): `genrec-fast report {out / 'best'} --data ... --out metrics.json` writes it")
        return 0
    rep = report(rec, leave_one_out(data), data.item_codes, p.train.num_beams, progress=not args.quiet)
    rep["train_seconds"] = round(train_s, 1)
    (out / "metrics.json").write_text(json.dumps(rep, indent=2))
    print(format_table({k: v for k, v in rep.items() if k in ("valid", "test")}))
    print(f"trained in {train_s:.0f} s; checkpoint {out / 'best'}; metrics {out / 'metrics.json'}; "
          f"curves {out / 'curves.png'}")
    _print_samples(rec, data)
    return 0


def cmd_train_sasrec(args) -> int:
    """Train the SASRec peer and report it (sasrec.py); `--set sasrec.FIELD=VALUE` or a JSON file with a
    "sasrec" section (`--config`) changes its settings."""
    import dataclasses
    from .evaluate import format_table
    from .sasrec import config_from, report_sasrec, train_sasrec
    _check_sasrec_flags(args)
    spec = {} if args.config is None else _sasrec_section(args.config)
    for key, value in map(parse_override, args.set):
        section, _, name = key.partition(".")
        if section != "sasrec":
            raise ValueError(f"--set {key}: with --model sasrec, expected sasrec.FIELD=VALUE")
        spec[name] = value
    flags = {"lr": args.lr, "batch_size": args.batch_size, "threads": args.threads, "dropout": args.dropout,
             "eval_users": args.eval_users}
    spec.update({k: v for k, v in flags.items() if v is not None})
    cfg = config_from(spec)
    out = run_dir(args, "sasrec")
    data = load_data(args)
    print(data.summary(), flush=True)
    t0 = time.perf_counter()
    with replacing_run(out, args.overwrite):
        model = train_sasrec(data, out, cfg, progress=not args.quiet)
    train_s = time.perf_counter() - t0
    rep = report_sasrec(model, leave_one_out(data), test=not args.no_report)  # --no-report: validation only
    rep["train_seconds"] = round(train_s, 1)
    rep["config"] = dataclasses.asdict(model.cfg)
    (out / "metrics.json").write_text(json.dumps(rep, indent=2))
    print(format_table({k: v for k, v in rep.items() if k in ("valid", "test")}))
    print(f"trained in {train_s:.0f} s; checkpoint {out / 'best'}; metrics {out / 'metrics.json'}")
    return 0


def _sasrec_section(config: str) -> dict:
    """The "sasrec" object of fields of a JSON config file (none: {}); a ValueError naming the file otherwise."""
    if not Path(config).is_file():
        raise ValueError(f"config: {config!r} is not a JSON file (with --model sasrec: a file with a \"sasrec\" "
                         "section; presets are GenRec's)")
    try:
        spec = json.loads(Path(config).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config: {config} is not valid JSON ({e})") from None
    spec = spec.get("sasrec", {}) if isinstance(spec, dict) else None
    if not isinstance(spec, dict):
        raise ValueError(f"config: {config}: expected a JSON object with a \"sasrec\" object of fields "
                         "(with --model sasrec)")
    return spec


GENREC_ONLY = ("pretrain_epochs", "finetune_epochs", "drop_user_prob")  # train's flags that SASRec has no use for


def _check_sasrec_flags(args) -> None:
    """--model sasrec: a ValueError naming a flag given that SASRec would ignore (--resume, GenRec's settings, a
    --device other than cpu)."""
    if args.resume:
        raise ValueError("--resume is not supported with --model sasrec (it keeps no training state to continue; "
                         "--overwrite trains it again)")
    for name in GENREC_ONLY:
        if getattr(args, name) is not None:
            raise ValueError(f"--{name.replace('_', '-')} is not supported with --model sasrec (a GenRec setting; "
                             "SASRec's are --set sasrec.FIELD=VALUE)")
    if check_device(args.device, "--device").type != "cpu":
        raise ValueError(f"--device {args.device}: SASRec trains on the CPU here; expected --device cpu")


RUN_FILES = ("best", "last", "log.jsonl", "metrics.json", "train_summary.json", "curves.png")  # what `train` writes
REPLACED = ".replaced-run"  # (under --out: the previous run while --overwrite trains its replacement)


def run_dir(args, config: str) -> Path:
    """--out, or runs/<data>-<config>: <data> is "synthetic", the data file's stem, or for P5's usual file name
    (sequential_data.txt) its folder's name. A directory that holds a run already (best/ or last/) is an error
    unless --resume continues it or --overwrite replaces it (`replacing_run` removes it once training writes)."""
    from .train import check_run_dir
    out = out_path(args, config)
    check_run_dir(out, args.resume, args.overwrite, ("--out", "--resume", "--overwrite"))
    return out


def out_path(args, config: str) -> Path:
    """The run directory of `train`: --out, or runs/<data>-<config> (`run_dir`)."""
    if args.out:
        return Path(args.out)
    data = Path(args.data) if args.data else None
    name = ("synthetic" if data is None else data.resolve().name if data.is_dir()
            else data.resolve().parent.name if data.stem == "sequential_data" else data.stem)
    return Path("runs") / f"{name}-{config}"


@contextlib.contextmanager
def replacing_run(out: Path, replace: bool):
    """A block that trains into `out`. With `replace` (--overwrite, on the main rank) the previous run's files
    (RUN_FILES) are moved into out/.replaced-run first; a block that fails before writing any of them (bad
    configuration, Ctrl-C while the tokenizer trains) gets them back, else they are deleted with the block."""
    old = [n for n in RUN_FILES if (out / n).exists()] if replace else []
    trash = out / REPLACED
    if old:
        shutil.rmtree(trash, ignore_errors=True)  # (left by a run that was killed)
        trash.mkdir()
        for n in old:
            (out / n).rename(trash / n)
    try:
        yield
    except BaseException:
        if old and not any((out / n).exists() for n in RUN_FILES):
            for n in old:
                (trash / n).rename(out / n)
        raise
    finally:
        if old:
            shutil.rmtree(trash, ignore_errors=True)


def _print_samples(rec, data, n: int = 3) -> None:
    split = leave_one_out(data)
    for u in range(min(n, data.n_users)):
        hist = [data.item_ids[i] for i in split.test_history(u)]
        r = rec.recommend([hist], k=5, users=[data.user_ids[u]])[0]
        print(f"user {data.user_ids[u]}: history ...{hist[-5:]} -> {r.items} "
              f"(held-out next item: {data.item_ids[split.test_target[u]]})")


def _load_checkpoints(args):
    """One checkpoint, or an ensemble of several (genrec_fast.load with a list)."""
    from .recommend import load
    paths = args.checkpoint
    return load(paths[0] if len(paths) == 1 else paths, args.device)


def _load_matching_data(args, catalog):
    """--data, checked against a checkpoint's catalog (`rec.catalog`, or a SASRec checkpoint's catalog.json)."""
    data = load_data(args)
    if data.item_ids != catalog.item_ids or data.user_ids != catalog.user_ids:
        if args.data is None:
            raise ValueError("--data: not given, so the built-in synthetic data was read, and the checkpoint was "
                             "trained on other data: pass its data file (with the same --format, --id-order, --seed)")
        raise ValueError("--data does not match the checkpoint's catalog (train and evaluate on the same file "
                         "with the same --id-order/--seed)")
    return data


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, model_ranker
    if _is_sasrec(args.checkpoint):  # the SASRec peer (`train --model sasrec`): its own ranker, same evaluation
        from .sasrec import sasrec_ranker
        model, data = _sasrec_and_data(args)
        ranker = sasrec_ranker(model)
    else:
        rec = _load_checkpoints(args)
        data = _load_matching_data(args, rec.catalog)
        ranker = model_ranker(rec, args.num_beams, use_user=not args.no_user)
    split = leave_one_out(data)
    users = None if not args.users else list(range(min(args.users, data.n_users)))
    m = evaluate(ranker, split, args.part, users, exclude_seen=args.exclude_seen, progress=not args.quiet)
    print(json.dumps(m, indent=2))
    return 0


def cmd_calibrate(args) -> int:
    """Fit the bias factors on the validation targets (calibrate.py) and write the calibrated checkpoint."""
    from . import checkpoint
    from .calibrate import calibrate
    from .recommend import _recommender
    if checkpoint.is_cascade(args.checkpoint):
        raise ValueError(f"checkpoint: {args.checkpoint} is a cascade; calibrate its retriever and ranker, then "
                         "build the cascade again (genrec-fast cascade)")
    if checkpoint.is_hybrid(args.checkpoint):
        raise ValueError(f"checkpoint: {args.checkpoint} is a hybrid; calibrate its GenRec model, then build the "
                         "hybrid again (genrec-fast hybrid)")
    check_out_dir(args.out, args.overwrite, [args.checkpoint])
    model, tokenizer, catalog, train_cfg, cfg = checkpoint.load_parts(args.checkpoint, args.device)
    rec = _recommender(model, tokenizer, catalog, train_cfg)
    data = _load_matching_data(args, catalog)
    users = None if not args.users else list(range(min(args.users, data.n_users)))
    out = calibrate(rec, leave_one_out(data), users, progress=not args.quiet)
    info = dict(cfg.get("info") or {}, calibration=dict(out, source=str(args.checkpoint)))
    checkpoint.save(args.out, rec.model, tokenizer, catalog, train_cfg, info=info)
    print(json.dumps(out, indent=2))
    print(f"calibrated checkpoint {args.out}")
    return 0


def cmd_cascade(args) -> int:
    """A retriever's candidates reranked by a one-token ranker, the weight chosen on validation (cascade.py)."""
    from .cascade import Cascade, fit_weight
    from .checkpoint import is_cascade
    from .recommend import load
    if args.beams is not None and args.beams < args.candidates:
        raise ValueError(f"--beams {args.beams}, --candidates {args.candidates}: expected --beams >= --candidates "
                         "(the retriever's best --candidates items of a --beams-wide search)")
    for name in ("retriever", "ranker"):
        if is_cascade(getattr(args, name)):
            raise ValueError(f"{name}: {getattr(args, name)} is a cascade; expected a model checkpoint")
    check_out_dir(args.out, args.overwrite, [args.retriever, args.ranker])
    cascade = Cascade(load(args.retriever, args.device), load(args.ranker, args.device), args.candidates,
                      0.5 if args.weight is None else args.weight, args.beams, not args.no_bias_items)
    data = _load_matching_data(args, cascade.catalog)
    if args.weight is None:
        users = None if not args.users else list(range(min(args.users, data.n_users)))
        print(json.dumps(fit_weight(cascade, leave_one_out(data), users, progress=not args.quiet), indent=2))
    cascade.save(args.out, args.retriever, args.ranker)
    print(f"cascade {args.out} (weight {cascade.weight}, {cascade.candidates} candidates of {cascade.beams} beams)")
    return 0


def cmd_hybrid(args) -> int:
    """A one-token GenRec model and a SASRec peer ranking the union of their top items, the weight chosen on
    validation (hybrid.py)."""
    from .cascade import fit_weight
    from .checkpoint import is_pair
    from .hybrid import Hybrid, load_sasrec_dir
    from .recommend import load
    for name in ("genrec", "sasrec"):
        if is_pair(getattr(args, name)):
            raise ValueError(f"{name}: {getattr(args, name)} is a cascade or hybrid; expected a model checkpoint")
    if not (Path(args.sasrec) / "sasrec.json").is_file():
        raise ValueError(f"sasrec: {args.sasrec} has no sasrec.json; expected a checkpoint of "
                         "`genrec-fast train --model sasrec` (its run's best/)")
    check_out_dir(args.out, args.overwrite, [args.genrec, args.sasrec])
    hybrid = Hybrid(load(args.genrec, args.device), *load_sasrec_dir(args.sasrec, args.device), args.candidates,
                    0.5 if args.weight is None else args.weight)
    data = _load_matching_data(args, hybrid.catalog)
    if args.weight is None:
        users = None if not args.users else list(range(min(args.users, data.n_users)))
        print(json.dumps(fit_weight(hybrid, leave_one_out(data), users, progress=not args.quiet,
                                    exclude_seen=args.exclude_seen), indent=2))
    hybrid.exclude_seen = hybrid.exclude_seen or args.exclude_seen  # recommend()'s and the server's default
    hybrid.save(args.out, args.genrec, args.sasrec)
    print(f"hybrid {args.out} (SASRec's weight {hybrid.weight}, {hybrid.candidates} candidates from each model)")
    if hybrid.fit:  # what to expect: a gain the held-out half does not confirm was fitted to noise
        v = hybrid.fit["valid_ndcg10"]
        print(f"validation NDCG@10: GenRec alone {v['0.0']:.4f}, the hybrid {v[str(hybrid.weight)]:.4f} "
              f"(weight chosen on the same users) and {hybrid.fit['held_out_ndcg10']:.4f} with the weight chosen "
              f"on the other half of the users")
    return 0


def check_out_dir(out: str, overwrite: bool, inputs: list) -> None:
    """The --out directory that calibrate and cascade write (replacing it whole): a ValueError where it is, is
    inside or holds one of the `inputs` checkpoints, is a file, or is a directory with files in it and not
    `overwrite`."""
    path = Path(out).resolve()
    for src in inputs:
        where = _overlap(path, Path(src).resolve())
        if where:
            raise ValueError(f"--out {out}: {where} the input checkpoint {src}; expected another directory")
    if path.is_file():
        raise ValueError(f"--out {out}: a file; expected a directory to write")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"--out {out}: not empty; --overwrite replaces it, or name another --out")


def _overlap(path: Path, other: Path) -> str:
    """How resolved `path` and `other` overlap: "is", "is inside", "holds", or "" (apart)."""
    return ("is" if path == other else "is inside" if other in path.parents else "holds" if path in other.parents
            else "")


def cmd_report(args) -> int:
    """The full report `train` writes (valid, test, excluding seen items, no user token, baselines)."""
    from .evaluate import format_table, report
    if _is_sasrec(args.checkpoint):
        from .sasrec import report_sasrec
        model, data = _sasrec_and_data(args)  # a SASRec peer trained with --no-report: its test, afterwards
        rep = report_sasrec(model, leave_one_out(data))
    else:
        rec = _load_checkpoints(args)
        data = _load_matching_data(args, rec.catalog)
        # the id-leak baseline reads the codes the model was trained with (--data's depend on --id-order/--seed)
        rep = report(rec, leave_one_out(data), rec.catalog.item_codes, args.num_beams, progress=not args.quiet)
    rep["checkpoints"] = [str(p) for p in args.checkpoint]
    seconds = [_train_seconds(Path(p)) for p in args.checkpoint]
    if all(s is not None for s in seconds):  # members' own training times, summed (not wall-clock if parallel)
        rep["train_seconds"], rep["member_train_seconds"] = round(sum(seconds), 1), seconds
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rep, indent=2))
    print(format_table({k: v for k, v in rep.items() if k in ("valid", "test")}))
    print(f"metrics {args.out}")
    return 0


def _is_sasrec(checkpoints: list) -> bool:
    """One checkpoint, written by `train --model sasrec` (evaluate and report score it; ensembles take GenRec's)."""
    return len(checkpoints) == 1 and (Path(checkpoints[0]) / "sasrec.json").is_file()


def _sasrec_and_data(args):
    """The SASRec checkpoint and its --data (checked against its catalog.json)."""
    from .data import Catalog
    from .sasrec import load
    from . import checkpoint
    path = Path(args.checkpoint[0])
    return load(path), _load_matching_data(args, Catalog(**checkpoint.read_json(path / "catalog.json")))


def _train_seconds(checkpoint: Path) -> float | None:
    """The training time of a `<run>/best` checkpoint, from `<run>/train_summary.json`."""
    from .checkpoint import read_json
    f = checkpoint.parent / "train_summary.json"
    return read_json(f).get("train_seconds") if f.is_file() else None


RECOMMEND_CHUNK = 1024  # lines a `recommend()` call at most: a large file streams out chunk by chunk


def cmd_recommend(args) -> int:
    """One JSON line of recommendations per history line, written as each chunk of lines is ranked: up to
    RECOMMEND_CHUNK lines, fewer whenever no more input is available yet (a program that writes a history and
    waits gets its answer at once). A bad line stops the run with an error naming it, after the lines before it
    are answered. With --skip-unknown a line whose ids are all unknown is answered with no items and an "error"
    (the answers stay one per line)."""
    rec = _load_checkpoints(args)
    skipped = [0, 0]  # unknown ids dropped (--skip-unknown), lines they were on
    rows = []  # (user, history of known ids)
    n = 0  # input lines read
    with contextlib.nullcontext(sys.stdin) if args.input in (None, "-") else open(args.input) as stream:
        for line in input_lines(stream):
            if line is None:  # the input would block: answer what has arrived
                _print_recommendations(rec, rows, args)
                rows = []
                continue
            n += 1
            tokens = line.split()
            if not tokens:
                continue
            user, history = (tokens[0], tokens[1:]) if args.with_user else (None, tokens)
            user = None if user is None else _lookup(rec.catalog.user_index, user)
            history = [_lookup(rec.catalog.item_index, t) for t in history]
            try:
                rows.append((user, _known_items(rec.catalog.item_index, history, n, args.skip_unknown, skipped)))
            except ValueError:  # the lines before the bad one still get their answers
                _print_recommendations(rec, rows, args)
                raise
            if len(rows) == RECOMMEND_CHUNK:
                _print_recommendations(rec, rows, args)
                rows = []
    _print_recommendations(rec, rows, args)
    if skipped[0]:
        print(f"skipped {skipped[0]} unknown item ids on {skipped[1]} lines (--skip-unknown)", file=sys.stderr)
    return 0


def input_lines(stream, block: int = 1 << 16):
    """The lines of a text stream, with None between them wherever reading on would wait for the writer (no
    complete line buffered, none readable now: select() on POSIX). A stream without a file descriptor (or off
    POSIX) yields its lines alone. Lines are decoded as the stream's encoding, a bad byte replaced."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is None or os.name != "posix":
        yield from stream
        return
    encoding, pending = getattr(stream, "encoding", None) or "utf-8", b""
    while True:
        if not select.select([fd], [], [], 0)[0]:
            yield None
        chunk = os.read(fd, block)  # (waits for the writer, or b"" at the end)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield line.decode(encoding, errors="replace")
    if pending:
        yield pending.decode(encoding, errors="replace")


def _known_items(index: dict, history: list, line: int, skip: bool, skipped: list) -> list:
    """The history's ids that the catalog knows; unknown ones are an error naming the line, or (skip) dropped
    and counted in skipped = [ids, lines] (None when none is left: the line gets an empty answer)."""
    bad = [x for x in history if x not in index]
    if bad and not skip:
        raise ValueError(f"line {line}: unknown item ids {data_mod.short_ids(bad)} (--skip-unknown drops them)")
    if bad:
        history = [x for x in history if x in index]
        skipped[0] += len(bad)
        skipped[1] += 1
    if not history and not bad:
        raise ValueError(f"line {line}: no item ids in the history")
    return history or None


def _print_recommendations(rec, rows: list, args) -> None:
    if not rows:
        return
    known = [(u, h) for u, h in rows if h is not None]  # (None: every id of the line unknown, --skip-unknown)
    recs = iter(rec.recommend([h for _, h in known], k=args.k, users=[u for u, _ in known],
                              exclude_seen=True if args.exclude_seen else None) if known else [])
    for u, h in rows:
        if h is None:
            print(json.dumps({"user": u, "items": [], "scores": [], "error": "no known item ids in the history"}))
            continue
        r = next(recs)
        print(json.dumps({"user": u, "items": r.items, "scores": [round(s, 5) for s in r.scores]}))
    sys.stdout.flush()


def cmd_serve(args) -> int:
    """Serve recommendations over HTTP with dynamic batching (serve.py; needs the `serve` extra)."""
    try:
        if args.engine == "aiohttp":
            from . import serve_aio as serve
        else:
            from . import serve
    except ImportError as e:
        print(f"error: `genrec-fast serve` needs the serve extra (pip install 'genrec-fast[serve]'): {e}",
              file=sys.stderr)
        return 2
    wait = serve.MAX_WAIT_MS[args.engine] if args.max_wait_ms is None else args.max_wait_ms
    serve.serve(args.checkpoint, args.host, args.port, args.max_batch, wait, args.device, args.threads,
                args.log_level, args.max_k)
    return 0


def _lookup(index: dict, token: str):
    """A token of an input line as the catalog spells the id (`data.resolve_id`: "27" finds a catalog's 27 or its
    "27"); an unknown one as typed, an int where it is one (for the error naming it)."""
    found = data_mod.resolve_id(index, token)
    return found if found is not None else int(token) if token.lstrip("-").isdigit() else token


DEVICE_HELP = "cpu (default), cuda or cuda:N"
THREADS_HELP = "torch threads (default: torch's own, the machine's cores)"


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    """--threads of a command that sets torch's thread count itself, before loading (`set_threads`)."""
    p.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    p.set_defaults(sets_threads=True)


def set_threads(args) -> None:
    """torch.set_num_threads(--threads) for the commands of `_add_threads_arg` (train and serve pass theirs on)."""
    if getattr(args, "sets_threads", False) and args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)


BEAMS_HELP = "beam width of the search (default %(default)s)"
ENSEMBLE_HELP = ("checkpoint directory (or a cascade or hybrid directory: genrec-fast cascade / hybrid); several = an ensemble of models "
                 "trained on the same data (e.g. other seeds)")


def _add_pair_args(p: argparse.ArgumentParser, kind: str, second: str) -> None:
    """The options `cascade` and `hybrid` share: data, the directory written, the weight and its fit."""
    _add_data_args(p)
    p.add_argument("--out", required=True,
                   help=f"{kind} directory to write ({kind}.json + copies of both checkpoints; not one of theirs)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds files (default: an error)")
    p.add_argument("--weight", type=float, help=f"{second} weight in [0, 1] (default: chosen on validation)")
    p.add_argument("--users", type=non_negative_int, default=0, help="choose the weight on the first N users (0 = all)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_threads_arg(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="genrec-fast", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model, then evaluate it against baselines")
    _add_data_args(t)
    t.add_argument("--model", default="genrec", choices=("genrec", "sasrec"),
                   help="genrec (default) or the SASRec peer (sasrec.py; settings: --set sasrec.FIELD=VALUE)")
    t.add_argument("--config", help="preset (recommended, codes, tiny, small, base) or a JSON file such as "
                   "configs/beauty-whole-small-nouser.json (default recommended: one token per item with the history "
                   "and transition biases; codes: the same with items as collaborative codes, the fast form at large "
                   "catalogs; small: the paper's sub-word pieces)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set tokenizer.item_tokens=whole (repeatable)")
    t.add_argument("--out", help="run directory (default runs/<data>-<config>: <data> is the data file's name, or its "
                                 "folder's for P5's sequential_data.txt)")
    for name, typ, what in (("pretrain-epochs", non_negative_int, "epochs of pretraining (train.pretrain_epochs)"),
                            ("finetune-epochs", non_negative_int, "epochs of finetuning (train.finetune_epochs)"),
                            ("batch-size", positive_int, "examples a step (train.batch_size; sasrec.batch_size)"),
                            ("lr", float, "learning rate (train.lr; sasrec.lr)"),
                            ("eval-users", non_negative_int, "users of each validation, 0 = all (train.eval_users; "
                                                             "sasrec.eval_users)"),
                            ("threads", positive_int, "torch threads (train.threads; sasrec.threads)")):
        t.add_argument(f"--{name}", type=typ, help=f"{what}; default: the config's")
    t.add_argument("--dropout", type=float, help="model dropout (model.dropout; sasrec.dropout); default: the config's")
    t.add_argument("--drop-user-prob", type=float, help="share of training examples without the user token "
                                                        "(train.drop_user_prob); default: the config's")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last/ "
                                                          "(repeat its --config and --set)")
    t.add_argument("--overwrite", action="store_true", help="replace the run in --out (default: an --out that holds "
                                                            "one is an error)")
    t.add_argument("--no-report", action="store_true",
                   help="skip the final report (~2 min on Beauty; e.g. for ensemble members, which "
                        "`genrec-fast report` scores together); with --model sasrec: validation only")
    for p in (t,):
        p.add_argument("--device", default="cpu",
                       help="cpu (default) or cuda; under torchrun each process takes cuda:LOCAL_RANK "
                            "(docs/training.md); --model sasrec: cpu only")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("evaluate", help="metrics of a checkpoint on its data")
    e.add_argument("checkpoint", nargs="+", help=ENSEMBLE_HELP)
    _add_data_args(e)
    e.add_argument("--part", default="test", choices=("valid", "test"),
                   help="score each user's held-out test item (default) or validation item")
    e.add_argument("--users", type=non_negative_int, default=0, help="evaluate the first N users only (0 = all)")
    e.add_argument("--num-beams", type=positive_int, default=20, help=BEAMS_HELP)
    e.add_argument("--exclude-seen", action="store_true", help="never rank a user's history items (default: they "
                                                                "may be recommended again)")
    e.add_argument("--no-user", action="store_true", help="omit the user token (as for a new user)")
    e.add_argument("--device", default="cpu", help=DEVICE_HELP)
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_threads_arg(e)
    e.set_defaults(func=cmd_evaluate)
    c = sub.add_parser("calibrate", help="fit the history/transition biases' weights on the validation targets "
                                         "(one factor each) and write the calibrated checkpoint")
    c.add_argument("checkpoint", help="a checkpoint with model.history_bias or model.transition_bias (one-token "
                                      "items, or codes with the leaf head)")
    _add_data_args(c)
    c.add_argument("--out", required=True, help="checkpoint directory to write (not one of the input's)")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it holds files (default: an error)")
    c.add_argument("--users", type=non_negative_int, default=0,
                   help="fit on the first N users' validation targets (0 = the default: a one-token model all users up "
                        "to 50,000, else 50,000 drawn at random; a codes model 6,000 drawn at random)")
    c.add_argument("--device", default="cpu", help=DEVICE_HELP)
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_threads_arg(c)
    c.set_defaults(func=cmd_calibrate)
    q = sub.add_parser("cascade", help="rerank a fast model's candidates (e.g. collaborative codes) with a one-token "
                                       "model, the weight of the two chosen on the validation targets")
    q.add_argument("retriever", help="checkpoint that proposes candidates (any item form)")
    q.add_argument("ranker", help="checkpoint of a one-token model (items of one token, no EOS step) that scores them")
    _add_pair_args(q, "cascade", "the ranker's")
    q.add_argument("--candidates", type=positive_int, default=20,
                   help="candidates per user from the retriever (default 20)")
    q.add_argument("--beams", type=positive_int, help="the retriever's beam width, at least --candidates (default: "
                                                      "--candidates; wider beams find better candidates, at the "
                                                      "retriever's cost)")
    q.add_argument("--no-bias-items", action="store_true",
                   help="candidates from the retriever only (default: also the items the ranker's history and "
                        "transition biases name)")
    q.set_defaults(func=cmd_cascade)
    h = sub.add_parser("hybrid", help="rank the union of a one-token GenRec model's and a SASRec peer's top items "
                                      "by both, the weight of the two chosen on the validation targets")
    h.add_argument("genrec", help="checkpoint of a one-token GenRec model (items of one token, no EOS step)")
    h.add_argument("sasrec", help="checkpoint of `genrec-fast train --model sasrec` on the same data")
    _add_pair_args(h, "hybrid", "SASRec's")
    h.add_argument("--candidates", type=positive_int, default=50,
                   help="candidates per user from each model (default 50)")
    h.add_argument("--exclude-seen", action="store_true",
                   help="choose the weight with history items excluded, and exclude them by default when serving")
    h.set_defaults(func=cmd_hybrid)
    f = sub.add_parser("report", help="the full report of train (valid, test, excluding seen, baselines) "
                                      "for a checkpoint or an ensemble")
    f.add_argument("checkpoint", nargs="+", help=ENSEMBLE_HELP)
    _add_data_args(f)
    f.add_argument("--out", required=True, help="metrics JSON file to write")
    f.add_argument("--num-beams", type=positive_int, default=20, help=BEAMS_HELP)
    f.add_argument("--device", default="cpu", help=DEVICE_HELP)
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads_arg(f)
    f.set_defaults(func=cmd_report)
    r = sub.add_parser("recommend", help="top-k items for histories read from a file or stdin")
    r.add_argument("checkpoint", nargs="+", help=ENSEMBLE_HELP)
    r.add_argument("--input", help="one history per line: item ids oldest first (default stdin); one JSON line "
                                   "out per non-empty line, empty lines skipped")
    r.add_argument("--with-user", action="store_true", help="the first id on each line is the user id")
    r.add_argument("-k", "--k", type=positive_int, default=10, help="items per history (default %(default)s)")
    r.add_argument("--exclude-seen", action="store_true",
                   help="never recommend a history's own items (always on for models trained with train.mask_seen)")
    r.add_argument("--skip-unknown", action="store_true", help="skip unknown item ids instead of failing")
    r.add_argument("--device", default="cpu", help=DEVICE_HELP)
    r.add_argument("--head-precision", choices=PRECISIONS, help=PRECISION_HELP)
    _add_threads_arg(r)
    r.set_defaults(func=cmd_recommend)
    s = sub.add_parser("serve", help="an HTTP endpoint (POST /recommend) batching concurrent requests")
    s.add_argument("checkpoint", nargs="+", help=ENSEMBLE_HELP)
    s.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default), 0.0.0.0 or ::")
    s.add_argument("--port", type=port, default=8000, help="TCP port (default %(default)s)")
    s.add_argument("--engine", default="aiohttp", choices=("aiohttp", "litserve"),  # serve_api.ENGINES
                   help="aiohttp (default: one process, the least CPU per request) or litserve (a model worker "
                        "process; several workers or GPUs)")
    s.add_argument("--max-batch", type=positive_int, default=64,  # serve_api.MAX_BATCH
                   help="requests per model call at most (default 64)")
    s.add_argument("--max-k", type=positive_int, default=1000,  # serve_api.MAX_K
                   help="k of a request at most; a larger one is a 422 naming k (default 1000)")
    s.add_argument("--max-wait-ms", type=non_negative_float, default=None,  # serve_api.MAX_WAIT_MS[engine]
                   help="how long a batch waits for more requests once none are queued (default: aiohttp 0, "
                        "litserve 2 ms)")
    s.add_argument("--device", default="cpu", help=DEVICE_HELP)
    s.add_argument("--threads", type=positive_int,
                   help="torch threads of the model's worker (default: all cores but one, for the HTTP process)")
    s.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="the server's log level (default %(default)s)")
    s.add_argument("--head-precision", choices=PRECISIONS, help=PRECISION_HELP)
    s.set_defaults(func=cmd_serve)
    return ap


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "head_precision", None):  # what every Recommender then takes (a serve worker process too)
        os.environ["GENREC_HEAD_PRECISION"] = args.head_precision
    try:
        with one_line_warnings():
            if getattr(args, "device", None) is not None:  # before any data or model is loaded
                check_device(args.device, "--device")
            set_threads(args)
            return args.func(args)
    except (ValueError, OSError, TypeError) as e:  # OSError: files, and a serve port already in use
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C: one line, not a traceback; 130 as a shell reports SIGINT
        print(f"interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130


def _resume_hint(args) -> str:
    """For an interrupted `train` whose run directory holds last/: where it stands and how to continue it
    (else "")."""
    if args.command != "train":
        return ""
    out = out_path(args, "sasrec" if args.model == "sasrec" else Path(args.config or "recommended").stem)
    if not (out / "last").is_dir():
        return ""
    epoch = _last_saved_epoch(out)
    where = f" holds the run after epoch {epoch}" if epoch else " holds the run's last epoch"
    flag = "--resume in place of --overwrite" if args.overwrite else "--resume"
    return f"; {out / 'last'}{where}: the same command with {flag} continues it"


def _last_saved_epoch(out: Path) -> int | None:
    """The last epoch of out/log.jsonl that out/last holds (one less when the log was written after last/'s
    files: interrupted between the two); None where the log cannot tell."""
    try:
        rows = (out / "log.jsonl").read_text().splitlines()
        epoch = int(json.loads(rows[-1])["epoch"])
        saved = max(f.stat().st_mtime for f in (out / "last").iterdir())
        return epoch - ((out / "log.jsonl").stat().st_mtime > saved)
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


@contextlib.contextmanager
def one_line_warnings():
    """Warnings shown as `warning: MESSAGE` on stderr (a category other than UserWarning named first), without
    Python's file:line prefix and source line, inside the block."""
    def show(message, category, filename, lineno, file=None, line=None):
        kind = "" if category is UserWarning else f"{category.__name__}: "
        print(f"warning: {kind}{message}", file=file or sys.stderr)
    saved = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = saved


def script() -> None:
    """The `genrec-fast` command and `python -m genrec_fast.cli`: main's code as the exit status. A torchrun worker
    (WORLD_SIZE > 1) leaves with os._exit once its output is flushed: its process group is destroyed already, and
    gloo's threads could still abort the interpreter's teardown ("terminate called without an active exception",
    seen once in CI after a finished run)."""
    from .distributed import env_world_size
    code = main()
    if env_world_size() > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    script()
