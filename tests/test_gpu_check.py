"""benchmarks/gpu_check.sh runs only on a lent GPU machine, with minutes of device time: its shell is checked here
(syntax, and the stage runner's time budget) so that a typo never costs a device call."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
bash = shutil.which("bash")
pytestmark = pytest.mark.skipif(bash is None, reason="no bash")


def test_the_script_parses():
    res = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_stages_share_the_budget_and_the_rest_are_skipped(tmp_path):
    """The script's own pack() and stage() functions: a stage gets at most the budget left, later ones are skipped
    and say so in summary.txt, and the archive holds the finished stages' logs."""
    text = SCRIPT.read_text()
    functions = re.search(r"^pack\(\).*?^}\n", text, re.S | re.M).group(0)
    logs = tmp_path / "logs"
    logs.mkdir()
    driver = f"""
LOGS={logs}; ARCHIVE={tmp_path}/a.tgz; status=0; T0=$(date +%s); GENREC_BUDGET_S=3; GENREC_MIN_STAGE_S=2
{functions}
stage quick 100 true
stage slow 100 sleep 60
stage later 100 true || echo "later returned $?"
GENREC_STAGES="other" stage unnamed 100 true
"""
    res = subprocess.run([bash, "-c", driver], capture_output=True, text=True, timeout=60)
    summary = (logs / "summary.txt").read_text().splitlines()
    assert re.fullmatch(r"quick: rc 0, [01] s", summary[0]), summary
    assert re.fullmatch(r"slow: rc 124, [1-3] s", summary[1]), summary  # cut at the budget left, not its 100 s
    assert re.fullmatch(r"later: skipped, -?\d+ s of GENREC_BUDGET_S left", summary[2]), summary
    assert "later returned 1" in res.stdout and len(summary) == 3  # an unnamed stage leaves no line
    listed = subprocess.run(["tar", "tzf", str(tmp_path / "a.tgz")], capture_output=True, text=True).stdout
    assert "./quick.log" in listed and "./slow.log" in listed


def test_without_a_gpu_it_stops_before_building(tmp_path):
    """No build, no install into the caller's environment, one clear line."""
    import os
    import sys
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the script would build")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    res = subprocess.run([bash, str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                         env=env)
    assert res.returncode == 1
    assert "torch sees no GPU here; nothing was built or installed" in res.stderr
    assert not (tmp_path / "out" / "logs" / "build.log").exists()
