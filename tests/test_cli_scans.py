"""Every `workbench scan ...` prints exactly its Result's summary() and stores a result that loads back."""
import pytest
from typer.testing import CliRunner

import workbench as wb
from workbench import duo, retrieval, routing, sinks, taxonomy
from workbench.cli import app

CASES = [
    (["retrieval", "--model", "tiny:llama", "--lengths", "400", "--depths", "1", "--max-new-tokens", "3"], retrieval.RetrievalResult),
    (["sinks", "--model", "tiny:llama", "--T", "32"], sinks.SinkResult),
    (["duo", "--model", "tiny:llama", "--steps", "1", "--length", "320"], duo.DuoResult),
    (["routing", "--model", "tiny-moe", "--max-tokens", "24"], routing.RoutingResult),
    (["heads", "--model", "tiny:llama", "--lengths", "48", "--texts", "1"], taxonomy.TaxonomyResult),
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("args, cls", CASES, ids=[c[0][0] for c in CASES])
def test_scan_prints_its_summary(tmp_path, args, cls):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["scan", *args, "--out", str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    result = cls.load(wb.ResultStore(out))
    assert result.summary() in res.output
    assert (out / "report.html").stat().st_size > 10_000
