"""`filipctl data filter` and `filipctl data backtranslate` as a user runs them, on shards in img2dataset's layout."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from jobs.data.shards import ShardWriter, iter_samples
from tests.conftest import run_cli


def _shards(folder: Path) -> None:
    """20 pairs with 64 px images and 10 with 16 px ones (dropped by min_side=32), English captions."""
    with ShardWriter(str(folder), 8) as w:
        for i in range(30):
            side = 64 if i < 20 else 16
            buf = io.BytesIO()
            Image.new("RGB", (side, side), (200, 30, 30)).save(buf, format="JPEG")
            w.write({"jpg": buf.getvalue(), "txt": f"a red square number {i} on a white table",
                     "json": {"key": "", "width": side, "height": side}})


def test_filter_command_reports_and_writes_the_kept_pairs(tmp_path: Path) -> None:
    _shards(tmp_path / "in")
    res = run_cli("data", "filter", str(tmp_path / "in" / "{00000..00003}.tar"), str(tmp_path / "out"),
                  "-s", "min_side=32", "--json", cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert (report["input"], report["kept"], report["dropped"]["min_side"]) == (30, 20, 10)
    kept = list(iter_samples(sorted(str(p) for p in (tmp_path / "out").glob("*.tar")), on_error=print))
    assert len(kept) == 20
    assert json.loads((tmp_path / "out" / "filter_report.json").read_text())["kept"] == 20


def test_data_commands_refuse_bad_settings_in_one_line(tmp_path: Path) -> None:
    _shards(tmp_path / "in")
    for argv, fragment in [
        (["data", "filter", str(tmp_path / "in"), str(tmp_path / "out"), "-s", "min_sid=3"], "min_sid"),
        (["data", "filter", str(tmp_path / "nowhere"), str(tmp_path / "out")], "no .tar shards"),
        (["data", "backtranslate", str(tmp_path / "in"), str(tmp_path / "out"), "--pivot", "de"], "LANG=TO_DIR,BACK_DIR"),
        (["data", "backtranslate", str(tmp_path / "in"), str(tmp_path / "out"), "--pivot", "de=/no/a,/no/b"],
         "is not a model folder"),
    ]:
        res = run_cli(*argv, cwd=tmp_path, timeout=120)
        assert res.returncode in (1, 2) and "Traceback" not in res.stderr, res.stderr
        assert fragment in res.stderr and res.stderr.count("error:") == 1, res.stderr
        assert not (tmp_path / "out").exists()
