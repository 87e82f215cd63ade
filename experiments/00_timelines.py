"""Timeline pictures of GPipe, 1F1B and interleaved 1F1B (P=4, M=8, V=2).

Every device holds an equal share of the model; a backward costs twice a
forward; the interleaved schedule splits each device's share into V chunks
of 1/V the cost. Writes experiments/results/timeline_<name>.png and prints
each table and its simulated bubble fraction next to the analytic one.

Run: python experiments/00_timelines.py
"""

import pathlib

from jaxpipe.plot import plot_timeline
from jaxpipe.schedule import make_schedule
from jaxpipe.simulate import Costs, simulate

P, M, V = 4, 8, 2
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name, chunks in (("gpipe", 1), ("1f1b", 1), ("interleaved", V)):
        schedule = make_schedule(name, P, M, chunks)
        sim = simulate(schedule, Costs.uniform(P, chunks, forward=1.0, backward=2.0))
        path = plot_timeline(sim, RESULTS / f"timeline_{name}.png")
        analytic = (P - 1) / (chunks * M + P - 1)
        print(schedule)
        print(f"bubble fraction {sim.bubble_fraction:.4f} (analytic {analytic:.4f}), "
              f"makespan {sim.makespan:g}, lock-step makespan {sim.lockstep_makespan:g}, "
              f"peak in flight per device {sim.peak_in_flight.tolist()} -> {path}\n")


if __name__ == "__main__":
    main()
