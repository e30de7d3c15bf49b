"""scripts/env.sh shows where it is: step k of n, what pip is on, and the time left, from pip's own output.

The progress functions are cut out of the real script and driven by a fake pip that prints what pip prints
(no environment is built: that takes minutes).
"""

from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT

FAKE_PIP = r"""fake_pip() {
  echo "Collecting torch (from -c)"; echo "  Downloading torch-2.14.1-cp311-manylinux.whl (180.2 MB)"; sleep 1.2
  echo "Processing /opt/pypi/files/numpy-2.3.0-cp311-manylinux.whl (from torch)"; sleep 1.2
  echo "Installing collected packages: numpy, torch"; sleep 1.2; }
"""


def test_env_sh_reports_step_package_and_time_left(tmp_path) -> None:
    script = (ROOT / "scripts/env.sh").read_text()
    progress = script[script.index("# -- progress"):script.index('echo "==> creating')]
    driver = "\n".join([
        "set -euo pipefail", f"ROOT={ROOT}", progress, FAKE_PIP,
        "STEP_SECONDS=(1 60 80 130 15)  # the measured step times, shortened for a test",
        f"LOG={tmp_path}/install.log; : > \"$LOG\"",
        "step; step; EXPECT=$PINNED; watch_step fake_pip",
        "step; watch_step bash -c 'exit 3' || echo \"failed: $?\"",
    ]).replace("tick % 15", "tick % 1")  # a status line each second instead of every 15 s (not a terminal)
    res = subprocess.run(["bash", "-c", driver], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert lines[0].startswith("==> [1/5] virtual environment (about ")
    assert lines[1].startswith("==> [2/5] torch, torchvision (about 4m")
    status = [ln for ln in lines if ln.startswith("    [2/5]")]
    assert any(f"1 of ~{pin_count()} packages resolved" in ln and "downloading torch (180.2 MB)" in ln for ln in status), status
    assert any("2 of ~" in ln and "resolving numpy" in ln for ln in status), status
    assert any("installing 2 packages" in ln for ln in status), status
    left = [int(m.group(1)) * 60 + int(m.group(2)) for ln in status for m in [re.search(r"about (\d+)m(\d\d)s left", ln)]]
    assert left == sorted(left, reverse=True) and left[0] > left[-1]  # counting down
    assert "failed: 3" in res.stdout  # the command's exit status comes through


def pin_count() -> int:
    """The packages constraints.txt pins: what the full install resolves."""
    return sum(1 for line in (ROOT / "constraints.txt").read_text().splitlines() if re.match(r"[A-Za-z0-9]", line))
