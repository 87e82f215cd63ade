"""The Colab quickstart notebook runs top to bottom in a fresh Jupyter kernel.

The kernel is a new Python process started without this test process's XLA
and JAX settings, so the notebook's own device cell must make the 8 fake CPU
devices. A cell appended to the in-memory copy reports the notebook's state
as JSON; the plots are checked in the cells' display outputs.
"""

import base64
import json
import math
import os
import pathlib

import nbformat
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "colab_quickstart.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_REPORT = """\
import json, os
print("REPORT " + json.dumps({
    "devices": len(jax.devices()), "platform": jax.devices()[0].platform, "mesh": list(MESH),
    "losses": result.losses, "vocab": VOCAB, "schedule": SCHEDULE, "ran": result.pipeline.schedule,
    "timeline": os.path.abspath(timeline), "bubble": sim.bubble_fraction,
}))"""


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("XLA_FLAGS", "JAX_PLATFORMS", "MPLBACKEND"):
        env.pop(name, None)
    return env


def _pngs(cell) -> list[bytes]:
    return [base64.b64decode(out["data"]["image/png"]) for out in cell.get("outputs", [])
            if out.get("output_type") == "display_data" and "image/png" in out.get("data", {})]


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_notebook_runs_on_8_fake_cpu_devices_and_learns(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_REPORT))
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=_kernel_env())  # raises CellExecutionError if any cell fails

    text = "".join(out.get("text", "") for out in nb.cells[-1].outputs if out.get("output_type") == "stream")
    report = json.loads(text.split("REPORT ", 1)[1])
    assert report["devices"] == 8 and report["platform"] == "cpu" and report["mesh"] == [2, 4]
    assert report["ran"] == report["schedule"]
    losses = report["losses"]
    uniform = math.log(report["vocab"])  # the loss of a uniform guess over the vocabulary
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[0] > 0.8 * uniform
    assert losses[-1] < 0.5 * uniform

    timeline = pathlib.Path(report["timeline"])
    assert timeline.parent == tmp_path and timeline.read_bytes().startswith(PNG_MAGIC)
    assert 0.0 < report["bubble"] < 1.0
    by_source = {cell.source: cell for cell in nb.cells if cell.cell_type == "code"}
    loss_plot = next(cell for source, cell in by_source.items() if "result.losses, label" in source)
    timeline_plot = next(cell for source, cell in by_source.items() if "plot_timeline" in source)
    assert [png.startswith(PNG_MAGIC) for png in _pngs(loss_plot)] == [True]
    assert _pngs(timeline_plot) == [timeline.read_bytes()]
