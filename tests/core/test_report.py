import matplotlib.pyplot as plt
import pytest

from sturdy.errors import ConfigurationError
from sturdy.report import Report, plot_training_curves


def test_report_writes_html_with_embedded_png(tmp_path):
    report = Report("t")
    sec = report.section("S")
    sec.text("a < b")
    sec.table(header=["k", "v"], rows=[["x", 0.123456], ["y", None]])
    history = [dict(epoch=1, train_loss=1.0, train_accuracy=0.5, test_loss=1.1, test_accuracy=0.4),
               dict(epoch=2, train_loss=0.5, train_accuracy=0.8, test_loss=0.6, test_accuracy=0.7)]
    sec.figure(plot_training_curves({"run": history}), name="curves.png", caption="c")
    path = report.write(tmp_path / "r.html")
    page = path.read_text()
    assert "a &lt; b" in page and "0.1235" in page and "data:image/png;base64," in page
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_report_validates_tables_and_names():
    sec = Report("t").section("S")
    with pytest.raises(ConfigurationError, match="has 1 cells, header has 2"):
        sec.table(header=["a", "b"], rows=[[1]])
    fig = plt.figure()
    with pytest.raises(ConfigurationError, match="plain file name ending in .png"):
        sec.figure(fig, name="../x.png")
    plt.close(fig)
