"""Figures are matplotlib Figure objects built without pyplot: no backend switch, no pyplot registry."""

from __future__ import annotations

import torch

from sturdy.fourier import fourier_heatmap, plot_examples, plot_fourier_maps, plot_perturbation

from .conftest import tiny_cnn

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_figures_are_plain_figures_and_save_as_png(tmp_path):
    from matplotlib.figure import Figure

    model = tiny_cnn((3, 6, 6))
    x = torch.rand(4, 3, 6, 6, dtype=torch.float64)
    delta = 0.1 * torch.randn(3, 6, 6, dtype=torch.float64)
    hm = fourier_heatmap(model, x, torch.zeros(4, dtype=torch.long), eps=1.0)
    figures = {
        "maps": plot_fourier_maps([("a", hm.full("fooling")), ("b", hm.full("error"))]),
        "delta": plot_perturbation(delta, title="d"),
        "examples": plot_examples(model, delta, x, n=3),
        "heatmap": hm.figure(),
    }
    for name, fig in figures.items():
        assert type(fig) is Figure and fig.canvas.manager is None, name  # not registered with pyplot
        fig.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert len(figures["examples"].axes) == 6
    hm.plot(tmp_path / "hm.png")
    assert (tmp_path / "hm.png").read_bytes()[:8] == PNG_MAGIC


def test_plotting_neither_switches_the_backend_nor_registers_figures():
    import matplotlib
    from matplotlib import _pylab_helpers

    backend, managers = matplotlib.get_backend(), _pylab_helpers.Gcf.get_num_fig_managers()
    plot_perturbation(torch.ones(1, 4, 4))
    plot_fourier_maps([("m", torch.rand(4, 4))])
    assert matplotlib.get_backend() == backend
    assert _pylab_helpers.Gcf.get_num_fig_managers() == managers
