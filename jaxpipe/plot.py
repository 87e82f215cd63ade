"""Timeline pictures of simulated schedules.

Drawn with matplotlib's Agg canvas directly (no pyplot), so plotting never
changes the caller's matplotlib backend.
"""

from __future__ import annotations

import os

from .schedule import BACKWARD, IDLE, WEIGHT, Schedule
from .simulate import Costs, SimResult, simulate


def _darker(rgb, factor: float = 0.6):
    return tuple(factor * channel for channel in rgb[:3])


def _lighter(rgb, factor: float = 0.5):
    return tuple(channel + factor * (1.0 - channel) for channel in rgb[:3])


def plot_timeline(sim_or_schedule: SimResult | Schedule, path: str | os.PathLike,
                  costs: Costs | None = None, title: str | None = None) -> str:
    """Draws one row per device (device 0 on top) of forward, backward and weight boxes.

    Boxes are coloured by micro-batch; a backward (in a split table: B, the
    input gradient) is a darker, hatched shade of its forward's colour, a W
    (weight gradient, split tables) a lighter, cross-hatched one. Each box is
    labelled with its micro-batch (and ``.chunk`` when V > 1); idle time
    stays white.

    Args:
      sim_or_schedule: a SimResult, or a Schedule to simulate with ``costs``.
      path: where to write the PNG.
      costs: costs for a Schedule; ``Costs.uniform(P, V)`` (backward twice the
        forward; for a split table B and W each equal to the forward) if
        None. Ignored for a SimResult.
      title: text before the schedule summary in the title.

    Returns:
      ``path`` as a string.

    Raises:
      TypeError: if ``sim_or_schedule`` is neither a SimResult nor a Schedule.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if isinstance(sim_or_schedule, Schedule):
        schedule = sim_or_schedule
        uniform = Costs.uniform(schedule.num_devices, schedule.virtual_stages, backward=1.0, weight=1.0)
        sim = simulate(schedule, costs or uniform)
    elif isinstance(sim_or_schedule, SimResult):
        sim, schedule = sim_or_schedule, sim_or_schedule.schedule
    else:
        kind = type(sim_or_schedule).__name__
        raise TypeError(f"plot_timeline needs a SimResult or a Schedule, got {kind}")
    P, M, V = schedule.num_devices, schedule.num_microbatches, schedule.virtual_stages
    cmap = matplotlib.colormaps["tab10" if M <= 10 else "tab20"]
    width = min(24.0, 4.0 + 0.45 * schedule.num_ticks)
    fig = Figure(figsize=(width, 0.6 * P + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    scale = sim.makespan / max(schedule.num_ticks, 1)
    for t, p in zip(*(schedule.op != IDLE).nonzero()):
        m, c = int(schedule.microbatch[t, p]), int(schedule.chunk[t, p])
        begin, span = sim.start[t, p], sim.end[t, p] - sim.start[t, p]
        colour = cmap(m % cmap.N)
        backward, weight = schedule.op[t, p] == BACKWARD, schedule.op[t, p] == WEIGHT
        fill = _darker(colour) if backward else _lighter(colour) if weight else colour
        ax.barh(p, span, left=begin, height=0.8, color=fill, edgecolor="black", linewidth=0.5,
                hatch="//" if backward else "xx" if weight else None)
        if span >= 0.45 * scale:
            label = f"{m}.{c}" if V > 1 else str(m)
            ax.text(begin + span / 2, p, label, ha="center", va="center", fontsize=8,
                    color="white" if backward else "black")
    ax.set_ylim(P - 0.5, -0.5)
    ax.set_yticks(range(P), [f"device {p}" for p in range(P)])
    ax.set_xlim(0, sim.makespan)
    ax.set_xlabel("time")
    summary = (f"{schedule.name}  P={P} M={M} V={V}  makespan={sim.makespan:g}  "
               f"bubble={sim.bubble_fraction:.1%}")
    ax.set_title(f"{title}: {summary}" if title else summary)
    handles = [Patch(facecolor="white", edgecolor="black", label="forward"),
               Patch(facecolor="white", edgecolor="black", hatch="//",
                     label="B (input gradient)" if schedule.split else "backward")]
    if schedule.split:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="xx", label="W (weight gradient)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    return str(path)
