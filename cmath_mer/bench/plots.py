"""The PNGs of a run: time and peak memory against conversation length, log scales.

* `<op>_<mode>_<dtype>.png`: one line per backend / batch / D / S (dashed = ragged batch).
* `long_conversations.png`: every long series, with a line of slope 1 (linear) through its first point
  and the time ratio per doubling of N written at each point.
"""
from __future__ import annotations

from pathlib import Path

from cmath_mer.bench.cases import LONG_OPS, WINDOW


def _figure(width: float, height: float):
    """A figure with a time axis and a memory axis side by side (matplotlib without a display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, 2, figsize=(width, height))


def _log_axes(axes_labels, xlabel: str, legend: bool) -> None:
    for ax, ylabel in axes_labels:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if legend:
            ax.legend(fontsize=7)


def _save(fig, title: str, fontsize: int, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_results(results: dict, out: Path) -> list[Path]:
    """One PNG per (op, mode, dtype): time and peak memory against N, one line per backend/batch/D/S."""
    figs: dict[tuple, list] = {}
    for r in results["rows"]:
        if r.get("status") == "ok":
            figs.setdefault((r["op"], r["mode"], r["dtype"]), []).append(r)
    written = []
    dev = results["machine"]["device_name"]
    for (op, mode, dtype), rows in figs.items():
        lines: dict[tuple, list] = {}
        for r in rows:
            lines.setdefault((r["backend"], r["batch"], r["D"], r["S"]), []).append(r)
        fig, (ax_t, ax_m) = _figure(11, 4.2)
        for (backend, batch, D, S), rs in sorted(lines.items()):
            rs = sorted(rs, key=lambda r: r["N"])
            label = backend + (f" S={S}" if op == "attention" else "") + \
                (f" D={D}" if op == "attention" and results["quick"] is False else "") + f" ({batch})"
            style = "--" if batch == "ragged" else "-"
            xs = [r["N"] for r in rs]
            ax_t.plot(xs, [r["median_s"] * 1e3 for r in rs], style, marker="o", ms=3, label=label)
            mem = [(r["N"], r["peak_mem_bytes"] / 2**20) for r in rs if r.get("peak_mem_bytes")]
            if mem:
                ax_m.plot(*zip(*mem), style, marker="o", ms=3, label=label)
        _log_axes(((ax_t, "median time per call (ms)"), (ax_m, "peak memory of the call (MiB)")),
                  "conversation length N (utterances)", legend=False)
        ax_t.legend(fontsize=7)
        written.append(_save(fig, f"{op} {mode} {dtype} — {results['device']}: {dev}", 10,
                             Path(out) / f"{op}_{mode}_{dtype}.png"))
    return written


def plot_long(results: dict, out: Path) -> list[Path]:
    """long_conversations.png: time and peak memory against N for every long series, with a line of
    slope 1 (linear) through each series' first point and the ratio per doubling written at each point."""
    series: dict = {}
    for r in results["rows"]:
        if r.get("op") in LONG_OPS and r.get("status") == "ok":
            series.setdefault((r["op"], r["backend"]), []).append(r)
    if not series:
        return []
    fig, (ax_t, ax_m) = _figure(12, 4.6)
    for (op, backend), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["N"])
        xs = [r["N"] for r in rs]
        ts = [r["median_s"] for r in rs]
        line, = ax_t.plot(xs, ts, marker="o", ms=4, label=f"{op} ({backend})")
        ax_t.plot(xs, [ts[0] * x / xs[0] for x in xs], ":", color=line.get_color(), lw=1)
        for r in rs:
            if r.get("time_ratio_per_doubling"):
                ax_t.annotate(f"x{r['time_ratio_per_doubling']:.2f}", (r["N"], r["median_s"]), fontsize=7,
                              textcoords="offset points", xytext=(3, -10))
        mem = [(r["N"], (r["peak_mem_bytes"] + r.get("rss_after_setup_bytes", 0)) / 2**30) for r in rs
               if r.get("peak_mem_bytes") is not None]
        if mem:
            ax_m.plot(*zip(*mem), marker="o", ms=4, color=line.get_color(), label=f"{op} ({backend})")
    _log_axes(((ax_t, "time of one call (s); dotted: linear"), (ax_m, "peak memory of the process (GiB)")),
              f"conversation length N (utterances), window {WINDOW}", legend=True)
    return [_save(fig, f"long conversations — {results['device']}: {results['machine']['device_name']} "
                       "(x = time ratio per doubling of N; 2.0 is linear)", 9, Path(out) / "long_conversations.png")]
