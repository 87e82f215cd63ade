"""Timeline PNGs."""

import pytest

from jaxpipe.plot import plot_timeline
from jaxpipe.schedule import make_schedule
from jaxpipe.simulate import Costs, simulate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name,V", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)])
def test_plot_schedule_writes_png(tmp_path, name, V):
    path = tmp_path / f"{name}.png"
    out = plot_timeline(make_schedule(name, 4, 8, V), path, title="test")
    assert out == str(path)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_sim_result_with_many_microbatches(tmp_path):
    schedule = make_schedule("1f1b", 3, 14)
    sim = simulate(schedule, Costs.uniform(3, comm=0.2))
    path = plot_timeline(sim, tmp_path / "sim.png")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_plot_rejects_other_inputs(tmp_path):
    with pytest.raises(TypeError, match="SimResult or a Schedule"):
        plot_timeline([1, 2], tmp_path / "x.png")
