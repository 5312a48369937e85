"""``deltakit score``: predictions made elsewhere (JSONL, VLMEvalKit .xlsx/.tsv) scored against a benchmark file,
the JSON report, the lenient column beside the official one, and the VLMEvalKit export read back."""

import base64
import io
import json

import pytest
from openpyxl import Workbook
from PIL import Image

from deltakit.cli import main


def png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def bench(tmp_path):
    """A VLMEvalKit MathVista_MINI-style TSV of four questions (row 3 shares row 1's image by index)."""
    head = "index\timage\tquestion\tanswer\tquestion_type\tanswer_type\tchoices\tprecision\tunit\tcategory"
    rows = [f"1\t{png()}\tWhich?\t145\tmulti_choice\ttext\t['120', '145']\t\t\tgeometry",
            f"2\t{png()}\tHow many?\t3\tfree_form\tinteger\t\t\t\tcounting",
            "3\t1\tLength?\t1.5\tfree_form\tfloat\t\t1\tcm\tgeometry",
            f"4\t{png()}\tCount?\t7\tfree_form\tinteger\t\t\t\tcounting"]
    path = tmp_path / "MathVista_MINI.tsv"
    path.write_text("\n".join([head, *rows]) + "\n")
    return path


# By calculate_score.py (lupantech/MathVista): 1 "(B)" -> "145" right; 2 "3" right; 3 "\boxed{1.5 cm}": float() fails
# -> None, wrong (lenient: units stripped, right); 4 "" -> wrong. Official 2/4, lenient 3/4.
PREDICTIONS = {"1": "The answer is (B)", "2": "3", "3": "\\boxed{1.5 cm}", "4": ""}


def test_score_jsonl_json_report(bench, tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"index": k, "prediction": v}) + "\n" for k, v in PREDICTIONS.items()))
    out = tmp_path / "score.json"
    main(["score", "--data", str(bench), "--predictions", str(preds), "--json", str(out), "--lenient"])
    data = json.loads(out.read_text())
    assert (data["benchmark"], data["examples"], data["correct"], data["lenient_correct"]) == ("mathvista", 4, 2, 3)
    assert data["accuracy"] == 0.5 and data["lenient_accuracy"] == 0.75 and data["missing"] == 0
    assert "GPT-free" in data["approximation"] and "calculate_score.py" in data["official"]
    assert {k: (v["examples"], v["correct"]) for k, v in data["categories"]["category"].items()} == {
        "counting": (2, 1), "geometry": (2, 1)}
    assert [(p["id"], p["extracted"], p["correct"]) for p in data["predictions"]] == [
        ("1", "(B)", True), ("2", "3", True), ("3", "1.5 cm", False), ("4", "", False)]
    text = capsys.readouterr().out
    assert "mathvista: 2/4 = 50.0% (official rules); lenient 3/4 = 75.0%" in text


def test_score_vlmevalkit_xlsx_and_export_round_trip(bench, tmp_path):
    book = Workbook()
    sheet = book.active
    sheet.append(["index", "question", "prediction"])
    for k, v in PREDICTIONS.items():
        sheet.append([int(k), "q", v or None])  # openpyxl reads an empty cell back as None: scored as ""
    book.save(tmp_path / "model_MathVista_MINI.xlsx")
    out = tmp_path / "x.json"
    export = tmp_path / "export.tsv"
    main(["score", "--data", str(bench), "--predictions", str(tmp_path / "model_MathVista_MINI.xlsx"), "--json", str(out),
          "--export-tsv", str(export)])
    data = json.loads(out.read_text())
    assert (data["correct"], data["lenient_correct"]) == (2, None)
    header, *lines = export.read_text().splitlines()
    assert header.split("\t") == ["index", "question", "answer", "question_type", "answer_type", "choices", "precision",
                                  "unit", "category", "prediction"]  # the TSV's columns minus image, plus prediction
    assert lines[0].split("\t")[0] == "1" and lines[0].split("\t")[-1] == "The answer is (B)"
    main(["score", "--data", str(bench), "--predictions", str(export), "--json", str(tmp_path / "y.json")])
    assert json.loads((tmp_path / "y.json").read_text())["predictions"] == data["predictions"]


def test_partial_and_wrong_predictions(bench, tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": "2", "prediction": "3"}) + "\n")
    main(["score", "--data", str(bench), "--predictions", str(preds), "--json", str(tmp_path / "s.json")])
    data = json.loads((tmp_path / "s.json").read_text())
    assert (data["examples"], data["correct"], data["missing"]) == (1, 1, 3)
    assert "3 questions without a prediction" in capsys.readouterr().out
    for content, message in [(json.dumps({"id": "99", "prediction": "3"}), "1 prediction(s) for ids not in"),
                             (json.dumps({"id": "2"}), "no 'prediction' field")]:
        preds.write_text(content + "\n")
        with pytest.raises(SystemExit) as exc:
            main(["score", "--data", str(bench), "--predictions", str(preds)])
        assert exc.value.code == 1
        assert message in capsys.readouterr().err
