"""`mmalign report-run --evals`: results files of every benchmark side by side (mmalign/report/evals.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.errors import DataError
from mmalign.report.evals import eval_tables, flat_metrics


def _write(path: Path, benchmark: str, metrics: dict, model: str) -> str:
    path.write_text(json.dumps({"benchmark": benchmark, "metrics": metrics, "model": model, "data": {},
                                "settings": {}}))
    return str(path)


def test_flat_metrics_joins_nested_names_and_drops_non_numbers():
    assert flat_metrics({"F1": 85, "existence": {"F1": 90.5, "note": "x"}, "ok": True}) == {
        "F1": 85.0, "existence/F1": 90.5}


def test_report_run_puts_base_and_aligned_side_by_side(tmp_path, capsys):
    files = [
        f"base={_write(tmp_path / 'cb.json', 'chair', {'CHAIR_s': 40.0, 'CHAIR_i': 12.5}, 'base')}",
        f"aligned={_write(tmp_path / 'ca.json', 'chair', {'CHAIR_s': 30.0, 'CHAIR_i': 10.0}, 'dpo')}",
        f"base={_write(tmp_path / 'pb.json', 'pope', {'random': {'F1': 80.0}, 'popular': {'F1': 70.0}}, 'base')}",
        f"aligned={_write(tmp_path / 'pa.json', 'pope', {'random': {'F1': 85.0}, 'popular': {'F1': 71.5}}, 'dpo')}",
        f"base={_write(tmp_path / 'mb.json', 'mmhal', {'Average score': 2.5, 'Hallucination rate': 0.5}, 'base')}",
        f"aligned={_write(tmp_path / 'ma.json', 'mmhal', {'Average score': 3.0, 'Hallucination rate': 0.375}, 'dpo')}",
        f"aligned={_write(tmp_path / 'ga.json', 'geneval', {'Overall': 0.5}, 'dpo')}",
    ]
    out = tmp_path / "r.html"
    assert main(["report-run", "--out", str(out), "--evals", *files]) == 0
    text = capsys.readouterr().out
    assert "== chair ==" in text and "== pope ==" in text and "== geneval ==" in text
    tables = {t["title"]: t for t in eval_tables([tuple(f.split("=", 1)) for f in files])}
    assert tables["chair"]["columns"] == ["metric", "base", "aligned", "aligned − base"]
    assert tables["chair"]["rows"] == [["CHAIR_s", "40.00", "30.00", "-10.00"], ["CHAIR_i", "12.50", "10.00", "-2.5"]]
    assert tables["pope"]["rows"] == [["random/F1", "80.00", "85.00", "5"], ["popular/F1", "70.00", "71.50", "1.5"]]
    assert tables["mmhal"]["rows"][1] == ["Hallucination rate", "0.5", "0.375", "-0.125"]
    assert tables["geneval"]["columns"] == ["metric", "aligned"] and tables["geneval"]["rows"] == [["Overall", "0.5"]]
    page = out.read_text()
    assert "<h2>Evaluations</h2>" in page and "aligned − base" in page and "random/F1" in page


def test_report_run_evals_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"CHAIR_s": 1}))
    assert main(["report-run", "--out", str(tmp_path / "r.html"), "--evals", f"base={bad}"]) == 2
    assert "bad.json is not an `mmalign eval --out` results file" in capsys.readouterr().err
    a = _write(tmp_path / "a.json", "chair", {"CHAIR_s": 1.0}, "m")
    with pytest.raises(DataError, match="two chair results for 'base'"):
        eval_tables([("base", a), ("base", a)])
    assert main(["report-run", "--out", str(tmp_path / "r.html"), "--evals", "nolabel.json"]) == 2
