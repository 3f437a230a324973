import io
import json
import os
import sys
import warnings
from pathlib import Path

import pytest

import genrec_fast

from genrec_fast.cli import main


def test_train_evaluate_recommend(p5_file, tmp_path, capsys, monkeypatch):
    out, cfg = tmp_path / "run", tmp_path / "whole.json"  # a JSON config file, with one token per item
    cfg.write_text(json.dumps({"preset": "tiny", "tokenizer": {"item_tokens": "whole"}}))
    assert main(["train", "--data", str(p5_file), "--config", str(cfg), "--pretrain-epochs", "1",
                 "--set", "train.finetune_epochs=1", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "best" / "tokenizer.json").read_text()) == {"item_tokens": "whole"}
    printed = capsys.readouterr().out
    assert "popularity" in printed and "genrec" in printed and "held-out next item" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"genrec", "popularity", "id_leak"} <= set(metrics["test"])
    assert main(["evaluate", str(out / "best"), "--data", str(p5_file), "--users", "30", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["users"] == 30 and 0 <= m["NDCG@10"] <= 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("1 3 5 7\n\n2 4\n"))
    assert main(["recommend", str(out / "best"), "--with-user", "-k", "4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["user"] for x in lines] == [1, 2] and all(len(x["items"]) == 4 for x in lines)
    monkeypatch.setattr(sys, "stdin", io.StringIO("3 5\n\n3 99999\n"))  # errors name the input line
    assert main(["recommend", str(out / "best"), "-k", "4"]) == 2
    captured = capsys.readouterr()
    assert "line 3: unknown item ids [99999] (--skip-unknown drops them)" in captured.err
    assert [len(json.loads(x)["items"]) for x in captured.out.splitlines()] == [4]  # line 1 still answered
    monkeypatch.setattr(sys, "stdin", io.StringIO("3 5\n3 99999 88888\n"))
    monkeypatch.setattr("genrec_fast.cli.RECOMMEND_CHUNK", 1)  # streamed a line at a time: the same answers
    assert main(["recommend", str(out / "best"), "-k", "4", "--skip-unknown"]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 unknown item ids on 1 lines" in captured.err
    streamed = [json.loads(x)["items"] for x in captured.out.splitlines()]
    assert streamed == [r.items for r in genrec_fast.load(out / "best").recommend([[3, 5], [3]], k=4)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("3 5\n99999\n3\n"))  # a line of unknown ids only: answered empty
    assert main(["recommend", str(out / "best"), "-k", "4", "--skip-unknown"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["items"] for x in lines] == [streamed[0], [], streamed[1]]
    assert lines[1]["error"] == "no known item ids in the history" and "error" not in lines[0]
    monkeypatch.setenv("GENREC_HEAD_PRECISION", "float32")  # (restored after the test: the flag sets it)
    monkeypatch.setattr(sys, "stdin", io.StringIO("3 5\n"))  # a 40-item catalog runs in float either way
    with warnings.catch_warnings():  # (a CPU without AVX512-BF16 warns that it runs in float32)
        warnings.simplefilter("ignore", RuntimeWarning)
        assert main(["recommend", str(out / "best"), "-k", "4", "--head-precision", "bfloat16"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == streamed[0]
    assert os.environ["GENREC_HEAD_PRECISION"] == "bfloat16" == genrec_fast.load(out / "best").head_precision


def test_recommend_answers_each_line_as_it_arrives(trained):
    """A program that writes one history and waits gets its answer while stdin stays open."""
    import select
    import subprocess
    rec, out = trained
    items = " ".join(str(i) for i in rec.catalog.item_ids[:3])
    with subprocess.Popen([sys.executable, "-m", "genrec_fast.cli", "recommend", str(out / "best"), "-k", "2"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            for _ in range(2):
                proc.stdin.write(items + "\n")
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], 120)  # (the start imports torch: seconds)
                assert ready, "no answer while the input stays open"
                assert json.loads(proc.stdout.readline())["items"] == rec.recommend([items.split()], k=2)[0].items
            proc.stdin.close()
            assert proc.wait(60) == 0 and proc.stdout.read() == ""
        finally:
            proc.kill()


def test_train_without_report_leaves_a_checkpoint_and_no_metrics(p5_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(p5_file), "--config", "tiny", "--pretrain-epochs", "0",
                 "--finetune-epochs", "1", "--out", str(out), "--quiet", "--no-report"]) == 0
    assert (out / "best").is_dir() and not (out / "metrics.json").exists()
    assert "no report" in capsys.readouterr().out
    assert main(["report", str(out / "best"), "--data", str(p5_file), "--out", str(out / "metrics.json"),
                 "--quiet"]) == 0
    assert {"genrec", "popularity"} <= set(json.loads((out / "metrics.json").read_text())["test"])


def test_train_defaults_to_the_recommended_preset(p5_file, tmp_path, capsys):
    from genrec_fast.config import preset
    out = tmp_path / "run"
    assert main(["train", "--data", str(p5_file), "--pretrain-epochs", "0", "--finetune-epochs", "1",
                 "--set", "train.calibrate=false", "--out", str(out), "--quiet", "--no-report"]) == 0
    saved = json.loads((out / "best" / "config.json").read_text())
    assert {k: saved["model"][k] for k in ("d_model", "history_bias", "transition_bias", "transition_reverse")} == \
        {k: getattr(preset("recommended").model, k) for k in ("d_model", "history_bias", "transition_bias",
                                                               "transition_reverse")}
    assert json.loads((out / "best" / "tokenizer.json").read_text())["item_tokens"] == "whole"


def test_errors_are_reported_not_raised(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3\n2 x 4\n")
    assert main(["train", "--data", str(bad), "--config", "tiny", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "bad.txt:2: item id 'x' is not an integer" in capsys.readouterr().err
    assert main(["recommend", str(tmp_path / "missing")]) == 2
    assert "missing: no such directory" in capsys.readouterr().err
    assert main(["train", "--data", str(bad), "--set", "train.epochs=3", "--quiet"]) == 2
    assert "train has no field 'epochs'" in capsys.readouterr().err


def test_a_data_file_read_as_p5_by_default_hints_at_its_format(tmp_path, capsys):
    (tmp_path / "r.csv").write_text("user,item,timestamp\n1,2,0\n")
    (tmp_path / "u.data").write_text("1\t2\t5\t0\n1\t3\t5\t1\n")
    (tmp_path / "r.txt").write_text("1 2 3\n2 x 4\n")
    for name, said in (("r.csv", "r.csv:1: user id 'user,item,timestamp' is not an integer; read as P5 (the "
                                 "default --format): is it a CSV file? pass --format csv"),
                       ("u.data", "user 1 appears on more than one line; read as P5 (the default --format): is it "
                                  "a MovieLens file? pass --format movielens"),
                       ("r.txt", "r.txt:2: item id 'x' is not an integer\n")):
        assert main(["train", "--data", str(tmp_path / name), "--out", str(tmp_path / "run")]) == 2
        assert said in capsys.readouterr().err, name


def test_calibrate_writes_a_checkpoint_that_scores_as_it_reports(p5_file, tmp_path, capsys):
    out, cfg = tmp_path / "run", tmp_path / "biased.json"
    cfg.write_text(json.dumps({"preset": "tiny", "tokenizer": {"item_tokens": "whole"},
                               "model": {"item_eos": False, "history_bias": True, "transition_bias": True}}))
    assert main(["train", "--data", str(p5_file), "--config", str(cfg), "--pretrain-epochs", "1",
                 "--set", "train.finetune_epochs=1", "--out", str(out), "--quiet", "--no-report"]) == 0
    capsys.readouterr()
    assert main(["calibrate", str(out / "best"), "--data", str(p5_file), "--out", str(out / "cal"), "--quiet"]) == 0
    got = json.loads(capsys.readouterr().out.split("\ncalibrated checkpoint")[0])
    assert set(got["scales"]) == {"history", "transition"}
    info = json.loads((out / "cal" / "config.json").read_text())["info"]["calibration"]
    assert info["scales"] == got["scales"] and info["source"] == str(out / "best")
    assert main(["evaluate", str(out / "cal"), "--data", str(p5_file), "--part", "valid", "--quiet"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["NDCG@10"] == pytest.approx(got["valid_ndcg10"]["after" if got["applied"] else "before"], abs=1e-6)
    assert main(["calibrate", str(out / "best"), "--data", str(p5_file), "--out", str(out / "x"), "--users", "1"]) == 2
    assert "calibrate needs at least 2 validation users" in capsys.readouterr().err


def test_checkpoint_paths_and_devices_are_named(p5_file, tmp_path, capsys):
    import shutil
    import torch
    out = tmp_path / "run"
    assert main(["train", "--data", str(p5_file), "--config", "tiny", "--pretrain-epochs", "0",
                 "--finetune-epochs", "1", "--out", str(out), "--quiet", "--no-report"]) == 0
    capsys.readouterr()
    (tmp_path / "sas").mkdir()
    (tmp_path / "sas" / "sasrec.json").write_text("{}")
    (tmp_path / "file.txt").write_text("x")
    broken = tmp_path / "broken"
    shutil.copytree(out / "best", broken)
    (broken / "weights.pt").write_bytes(b"not a checkpoint")
    for path, said in ((out, f"a run directory; its checkpoint is {out / 'best'}"),
                       (tmp_path / "file.txt", "a file, expected a checkpoint directory"),
                       (tmp_path / "sas", "a SASRec model"),
                       (broken, "weights.pt cannot be read")):
        assert main(["recommend", str(path)]) == 2
        assert said in capsys.readouterr().err, path
    assert main(["evaluate", str(out / "best"), "--quiet"]) == 2  # no --data: the synthetic data is not its data
    assert "--data: not given, so the built-in synthetic data was read" in capsys.readouterr().err
    leak = []  # the id-leak baseline reads the model's item codes, not those another --seed gives the data
    for seed in ("0", "1"):
        assert main(["report", str(out / "best"), "--data", str(p5_file), "--seed", seed, "--quiet",
                     "--out", str(tmp_path / f"r{seed}.json")]) == 0
        leak.append(json.loads((tmp_path / f"r{seed}.json").read_text())["test"]["id_leak"])
    assert leak[0] == leak[1]
    assert main(["recommend", str(out / "best"), "--device", "gpu"]) == 2
    assert "--device: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="device: expected 'cpu'"):
        genrec_fast.load(out / "best", device="tpu0")
    if not torch.cuda.is_available():
        assert main(["train", "--data", str(tmp_path / "never read"), "--device", "cuda"]) == 2
        assert "--device: 'cuda' needs a CUDA GPU" in capsys.readouterr().err
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            genrec_fast.load(out / "best", device="cuda")


def test_bad_numbers_and_devices_are_one_line_errors(tmp_path, capsys):
    """Checked before anything is loaded: the message names the flag and what it expects."""
    for argv, said in ((["evaluate", "ckpt", "--users", "-5"], "--users: expected an integer >= 0, got '-5'"),
                       (["evaluate", "ckpt", "--num-beams", "0"], "--num-beams: expected a positive integer"),
                       (["report", "ckpt", "--out", "m.json", "--num-beams", "0"], "--num-beams: expected a positive"),
                       (["recommend", "ckpt", "-k", "0"], "-k/--k: expected a positive integer, got '0'"),
                       (["calibrate", "ckpt", "--out", "x", "--users", "-1"], "--users: expected an integer >= 0"),
                       (["cascade", "a", "b", "--out", "x", "--candidates", "0"], "--candidates: expected a positive"),
                       (["serve", "ckpt", "--max-wait-ms", "-5"], "--max-wait-ms: expected a number >= 0")):
        with pytest.raises(SystemExit):
            main(argv)
        assert said in capsys.readouterr().err, argv
    for device in ("mps", "xpu", "meta", "cpu:0x"):
        for argv in (["recommend", str(tmp_path)], ["train", "--data", str(tmp_path / "never read")]):
            assert main(argv + ["--device", device]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: --device: expected 'cpu', 'cuda' or 'cuda:N'") and "Traceback" not in err


def test_calibrate_and_cascade_keep_what_out_holds_unless_asked(tmp_path, capsys):
    """Checked before any checkpoint is read: a non-empty --out needs --overwrite; an input's own directory never."""
    ckpt, other, full = tmp_path / "run" / "best", tmp_path / "other", tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    (tmp_path / "file").write_text("x")
    for out, said in ((full, "not empty; --overwrite replaces it"), (tmp_path / "file", "a file; expected a directory"),
                      (ckpt, "is the input checkpoint"), (ckpt / "cal", "is inside the input checkpoint"),
                      (tmp_path / "run", "holds the input checkpoint")):
        for argv in (["calibrate", str(ckpt)], ["cascade", str(other), str(ckpt)]):
            assert main(argv + ["--out", str(out)]) == 2
            assert f"--out {out}: {said}" in capsys.readouterr().err, (argv, out)
    assert main(["calibrate", str(ckpt), "--out", str(full), "--overwrite"]) == 2  # past the check: no checkpoint
    assert "no such directory" in capsys.readouterr().err and (full / "keep.txt").exists()


def test_a_damaged_json_file_is_named(tmp_path, capsys):
    for name, argv in (("sasrec.json", ["evaluate", str(tmp_path), "--quiet"]),
                       ("cascade.json", ["recommend", str(tmp_path)])):
        (tmp_path / name).write_text('{"bad\x01')
        assert main(argv) == 2
        assert f"{name} is not valid JSON (Invalid control character" in capsys.readouterr().err, name
        (tmp_path / name).unlink()


def test_a_run_directory_is_not_overwritten_unless_asked(p5_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(p5_file), "--config", "tiny", "--pretrain-epochs", "0", "--finetune-epochs", "1",
            "--out", str(out), "--quiet", "--no-report"]
    assert main(args) == 0
    (out / "best" / "marker").write_text("the first run")
    capsys.readouterr()
    assert main(args) == 2
    assert f"--out {out}: holds a run already (best/, last/); --resume continues it" in capsys.readouterr().err
    assert (out / "best" / "marker").exists()
    (out / "metrics.json").write_text("{}")  # the first run's report
    short = tmp_path / "short.txt"  # loads, but Trainer refuses it (no finetuning examples)
    short.write_text("".join(f"{u} {u + 1} {u + 2} {u + 3}\n" for u in range(1, 30)))
    for data, said in ((tmp_path / "missing.txt", "missing.txt"), (short, "no finetuning examples")):
        bad = [str(data) if a == str(p5_file) else a for a in args]
        assert main(bad + ["--overwrite"]) == 2  # the old run stays until training writes
        assert said in capsys.readouterr().err
        assert (out / "best" / "marker").exists() and (out / "last").is_dir() and (out / "metrics.json").exists()
    assert main(args + ["--overwrite", "--resume"]) == 2
    assert "--resume, --overwrite: expected one of them" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert (out / "best" / "config.json").exists() and not (out / "best" / "marker").exists()
    assert not (out / "metrics.json").exists() and sorted(p.name for p in out.iterdir()) == [
        "best", "curves.png", "last", "log.jsonl", "train_summary.json"]  # (--no-report: no metrics.json)
    assert main(["train", "--model", "sasrec", "--out", str(out)]) == 2  # the SASRec peer checks it too
    assert "holds a run already" in capsys.readouterr().err


def test_every_option_has_help():
    import argparse
    from genrec_fast.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not a.help]
    assert not missing


def test_default_run_directories_are_named_after_the_data(tmp_path):
    from genrec_fast.cli import build_parser, run_dir
    (tmp_path / "beauty").mkdir()
    (tmp_path / "beauty" / "sequential_data.txt").write_text("1 2 3\n")
    (tmp_path / "ratings.csv").write_text("user,item,timestamp\n")
    for data, want in ((None, "synthetic-recommended"), (tmp_path / "beauty" / "sequential_data.txt",
                                                         "beauty-recommended"),
                       (tmp_path / "beauty", "beauty-recommended"), (tmp_path / "ratings.csv", "ratings-recommended")):
        args = build_parser().parse_args(["train"] + ([] if data is None else ["--data", str(data)]))
        assert run_dir(args, "recommended") == Path("runs") / want


def test_csv_columns_and_ids_that_look_like_numbers(tmp_path, capsys, monkeypatch):
    """--columns names a CSV's columns; a catalog of string ids ("27", "x4") is read back from the ids as typed."""
    rows = [(u, f"x{(u + j) % 9}" if (u + j) % 3 else str((u + j) % 9 + 20), j) for u in range(40) for j in range(6)]
    (tmp_path / "r.csv").write_text("userId,movieId,ts\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    out = tmp_path / "run"
    base = ["train", "--data", str(tmp_path / "r.csv"), "--format", "csv", "--config", "tiny", "--pretrain-epochs",
            "0", "--finetune-epochs", "1", "--out", str(out), "--quiet", "--no-report"]
    assert main(base) == 2
    assert "--columns USER,ITEM,TIME" in capsys.readouterr().err
    assert main(base + ["--columns", "userId,movieId"]) == 2
    assert "--columns: expected USER,ITEM,TIME" in capsys.readouterr().err
    assert main(base + ["--columns", "userId, movieId, ts"]) == 0
    capsys.readouterr()
    rec = genrec_fast.load(out / "best")
    assert "23" in rec.catalog.item_index and 23 not in rec.catalog.item_index  # string ids, digits or not
    monkeypatch.setattr(sys, "stdin", io.StringIO("x4 23 x5\n"))
    assert main(["recommend", str(out / "best"), "-k", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == rec.recommend([["x4", "23", "x5"]], k=3)[0].items


def test_training_that_cannot_learn_is_refused(tmp_path, capsys):
    short = tmp_path / "short.txt"  # 3 items a user: after validation and test, one item to train on, no target
    short.write_text("".join(f"{u} {u + 1} {u + 2} {u + 3}\n" for u in range(1, 30)))
    assert main(["train", "--data", str(short), "--config", "tiny", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "no finetuning examples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--batch-size", "0"])
    assert "--batch-size: expected a positive integer" in capsys.readouterr().err
    with open(short, "a") as f:  # an empty line: a warning, shown on one line
        f.write("\n")
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # (shown, not an error, as outside pytest)
        assert main(["train", "--data", str(short), "--config", "tiny", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"warning: {short}: skipped 1 empty lines" and err[1].startswith("error: no finetuning examples")


def test_resuming_with_another_config_is_a_one_line_error(p5_file, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--data", str(p5_file), "--config", "tiny", "--pretrain-epochs", "0", "--finetune-epochs", "1",
              "--out", str(out), "--quiet", "--no-report"]
    assert main(common) == 0
    capsys.readouterr()
    assert main(common + ["--resume", "--set", "model.d_model=16"]) == 2
    err = capsys.readouterr().err
    assert "error: resume:" in err and "model.d_model 32 -> 16" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["evaluate", "report", "calibrate", "cascade", "recommend"])
def test_threads_sets_torchs_thread_count(command, tmp_path, monkeypatch):
    import torch
    from genrec_fast import cli
    fn = {"evaluate": "cmd_evaluate", "report": "cmd_report", "calibrate": "cmd_calibrate", "cascade": "cmd_cascade",
          "recommend": "cmd_recommend"}[command]
    seen = []
    monkeypatch.setattr(cli, fn, lambda args: seen.append(torch.get_num_threads()) or 0)
    argv = {"evaluate": ["ck"], "report": ["ck", "--out", "m.json"], "calibrate": ["ck", "--out", "o"],
            "cascade": ["a", "b", "--out", "o"], "recommend": ["ck"]}[command]
    before = torch.get_num_threads()
    want = 2 if before == 1 else 1
    try:
        assert main([command, *argv, "--threads", str(want)]) == 0
        assert seen == [want]
        torch.set_num_threads(before)
        assert main([command, *argv]) == 0 and seen[-1] == before  # without --threads: left as it was
    finally:
        torch.set_num_threads(before)
    assert cli.build_parser().parse_args([command, *argv]).threads is None
    with pytest.raises(SystemExit):
        main([command, *argv, "--threads", "0"])


def test_ctrl_c_is_one_line_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from genrec_fast import cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_train", interrupted)
    monkeypatch.setattr(cli, "cmd_evaluate", interrupted)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out)]) == 130  # nothing saved yet
    assert capsys.readouterr().err == "interrupted\n"
    (out / "last").mkdir(parents=True)
    (out / "last" / "weights.pt").write_text("")
    (out / "log.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    os.utime(out / "log.jsonl", (1, 1))  # written before last/'s files: last/ holds epoch 2
    assert main(["train", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"interrupted; {out / 'last'} holds the run after epoch 2") and "--resume" in err
    assert len(err.splitlines()) == 1
    assert main(["evaluate", "ck"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
