"""A trace of timed events per rank: what each process did and when, as JSON and as a Gantt chart.

Events are (rank, name, micro-batch, start, end) with times in seconds from the start of the step
(wall clock in the executor, ticks for the logical clock of schedule.simulate). `to_json` writes
Chrome's trace-event format, which chrome://tracing and ui.perfetto.dev open directly.
"""
import io
import json
from pathlib import Path

from ..fileio import atomic_write_bytes

COLORS = {"F": "#4c72b0", "B": "#dd8452", "W": "#55a868", "allreduce": "#8172b3", "reduce_scatter": "#937860"}
COMM = ("allreduce", "reduce_scatter")  # drawn as thin bars under the compute: they may overlap it


class Trace:
    def __init__(self):
        self.events = []  # (rank, name, mb, start, end)

    def add(self, rank, name, mb, start, end):
        self.events.append((int(rank), str(name), mb, float(start), float(end)))

    @classmethod
    def from_simulation(cls, events):
        """From schedule.simulate's output: stage index = rank."""
        t = cls()
        for s, ev in enumerate(events):
            for kind, mb, t0, t1 in ev:
                t.add(s, kind, mb, t0, t1)
        return t

    def to_json(self, path=None):
        doc = {"traceEvents": [
            {"name": f"{name}{'' if mb is None else mb}", "cat": name, "ph": "X", "pid": 0, "tid": rank,
             "ts": start * 1e6, "dur": (end - start) * 1e6, "args": {"micro_batch": mb}}
            for rank, name, mb, start, end in self.events], "displayTimeUnit": "ms"}
        if path is not None:
            atomic_write_bytes(path, json.dumps(doc).encode())
        return doc

    def gantt(self, path, title="pipeline schedule", unit="s", labels=None):
        """A PNG: one row per rank, one bar per event labelled with its micro-batch.
        labels: rank -> row label (default "stage r", right for a schedule's simulation).

        Drawn on a matplotlib Figure of its own (not pyplot), so the process's backend is left as it
        was (plots still show in a notebook afterwards); written atomically."""
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle

        ranks = sorted({e[0] for e in self.events})
        fig = Figure(figsize=(10, 0.6 * len(ranks) + 1.4))
        ax = fig.subplots()
        for rank, name, mb, start, end in self.events:
            y, h = (rank + 0.3, 0.25) if name in COMM else (rank - 0.08, 0.6)
            ax.barh(y, end - start, height=h, left=start, color=COLORS.get(name, "#999999"), edgecolor="black", lw=0.5)
            if mb is not None:
                ax.text((start + end) / 2, y, str(mb), ha="center", va="center", fontsize=6 if name in COMM else 7,
                        color="white")
        ax.set_yticks(ranks)
        ax.set_yticklabels([(labels or {}).get(r, f"stage {r}") for r in ranks])
        ax.invert_yaxis()
        ax.set_xlabel(f"time ({unit})")
        ax.set_title(title)
        shown = [n for n in COLORS if any(e[1] == n for e in self.events)]
        ax.legend([Rectangle((0, 0), 1, 1, color=COLORS[n]) for n in shown], shown, loc="upper left",
                  bbox_to_anchor=(1.0, 1.0), fontsize=8)  # beside the bars, not over them
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        atomic_write_bytes(path, buf.getvalue())
        return Path(path)
