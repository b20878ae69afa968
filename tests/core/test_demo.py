import json
from dataclasses import dataclass, field
from typing import List

import pytest

from sturdy.cli import main
from sturdy.experiments.demo import run_demo
from sturdy.experiments.parts import PART_NAMES as PARTS
from sturdy.report import new_figure


@dataclass
class _StubSection:
    """A part that records what the orchestration hands it and adds a small section."""

    name: str
    seen: List[dict] = field(default_factory=list)
    fail: bool = False

    def demo_section(self, ctx) -> None:
        if self.fail:
            raise RuntimeError(f"{self.name} broke")
        self.seen.append({"models": sorted(ctx.models), "quick": ctx.quick, "train": len(ctx.train_set),
                          "training": ctx.models["standard"].training, "before": sorted(ctx.results)})
        ctx.results[self.name] = {"value": len(self.seen)}
        sec = ctx.report.section(f"{self.name} section")
        sec.text(f"text of {self.name}")
        fig, ax = new_figure(figsize=(2, 2))
        ax.plot([0, 1], [0, 1])
        sec.figure(fig, name=f"{self.name}.png")


def test_demo_orchestration_runs_every_section_in_order(tmp_path):
    parts = [_StubSection("alpha"), _StubSection("beta")]
    path = run_demo(out=tmp_path, quick=True, device="cpu", progress=False, parts=parts)
    page = path.read_text()
    assert page.index("Training") < page.index("alpha section") < page.index("beta section") < page.index("Run")
    assert "data:image/png;base64," in page
    results = json.loads((tmp_path / "demo.json").read_text())
    assert results["alpha"] == {"value": 1} and results["beta"] == {"value": 1}
    assert set(results["seconds"]) == {"standard", "alpha", "beta", "total"}
    assert 0.5 < results["standard"]["test_accuracy"] <= 1.0  # 3 epochs of the digits CNN
    # each section sees the trained standard model in eval mode and the results of the sections before it
    assert parts[0].seen == [{"models": ["standard"], "quick": True, "train": 1300, "training": False,
                              "before": ["quick", "seconds", "standard"]}]
    assert "alpha" in parts[1].seen[0]["before"]
    for name in ("alpha.png", "beta.png", "training_curves.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_demo_section_failure_propagates_and_writes_no_results(tmp_path):
    with pytest.raises(RuntimeError, match="beta broke"):
        run_demo(out=tmp_path, quick=True, device="cpu", progress=False,
                 parts=[_StubSection("alpha"), _StubSection("beta", fail=True)])
    assert not (tmp_path / "demo.json").exists() and not (tmp_path / "report.html").exists()


def test_demo_default_parts_are_the_four_parts():
    assert PARTS == ("lipschitz", "fourier", "flatness", "compression")


@pytest.mark.slow
def test_quick_demo_writes_report_and_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    page = (out / "report.html").read_text()
    results = json.loads((out / "demo.json").read_text())
    for part in PARTS:
        assert part in results and part in results["seconds"]
    assert results["quick"] is True and 0.5 < results["standard"]["test_accuracy"] <= 1.0
    assert page.count("data:image/png;base64,") >= 5
    assert "report written to" in capsys.readouterr().out
