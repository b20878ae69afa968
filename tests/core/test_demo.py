import json

from sturdy.cli import main


def test_quick_demo_writes_report_and_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "Training" in page
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True and 0.0 <= results["standard"]["test_accuracy"] <= 1.0
    assert (out / "training_curves.png").is_file()
    assert "report written to" in capsys.readouterr().out
