"""Results store round trip, HTML report (offline), and the scan CLI's error handling."""
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

import workbench as wb
from workbench.base import plots
from workbench.views import report
from workbench.store import ResultStore


def test_store_round_trip_with_provenance(tmp_path, tiny):
    store = ResultStore(tmp_path)
    prov = tiny("llama").provenance.with_run(token_ids=[1, 2, 3], definition="test")
    df = pd.DataFrame({"layer": [0, 1], "head": [2, 3], "score": [0.5, 0.25], "heads": [[(1, 2)], []]})
    store.save("scores", df, prov)
    back, meta = store.load("scores")
    assert back[["layer", "head", "score"]].equals(df[["layer", "head", "score"]])
    assert json.loads(back["heads"][0]) == [[1, 2]]
    assert meta["token_ids"] == [1, 2, 3] and meta["definition"] == "test" and meta["weights_hash"].startswith("blake2b:")
    assert store.sql("SELECT sum(score) AS s FROM scores")["s"][0] == pytest.approx(0.75)
    assert [p.name for p in tmp_path.iterdir()] == ["scores.parquet"]  # no temp files left behind
    for bad in ("../x", "", ".hidden"):
        with pytest.raises(wb.WorkbenchError, match="plain file name"):
            store.save(bad, df)
    with pytest.raises(wb.WorkbenchError, match="no result"):
        store.load("missing")


def test_report_is_self_contained(tmp_path):
    fig = plots.head_grid(torch.rand(3, 4), "x")
    grid = pd.DataFrame([[1.0, 0.0]], index=[50.0], columns=[500, 1000])
    page = report.write_html(tmp_path / "r.html", "t", [("a", fig), ("b", plots.niah_grid(grid)), ("c", grid), ("d", "<b>text</b>")])
    text = page.read_text()
    assert text.count("plotly.js v") >= 1 and "<script src=\"http" not in text  # plotly.js inlined, no CDN script
    assert text.count('class="plotly-graph-div"') == 2
    assert "<b>text</b>" not in text and "&lt;b&gt;text&lt;/b&gt;" in text  # page text is escaped


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "workbench", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["scan", "retrieval", "--model", "tiny:llama", "--lengths", "9000"], "exceeds the model's 512 positions"),
        (["scan", "retrieval", "--model", "tiny:llama", "--lengths", "a,b"], "comma-separated integers"),
        (["scan", "sinks", "--model", "tiny:llama", "--eps", "1.5"], "ε must lie in (0, 1)"),
    ],
)
def test_scan_cli_bad_input(args, message):
    proc = _cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_scan_cli_writes_results(tmp_path):
    proc = _cli("scan", "sinks", "--model", "tiny:llama", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "Sink_1^0.3" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "sinks_alpha.parquet", "sinks_massive.parquet", "sinks_tokens.parquet"]
