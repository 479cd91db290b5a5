"""Job tables and charts (pandas + plotnine, the ``plot`` extra).

``Plot(jobs).build(...)`` draws ezpq's Gantt chart on current pandas and
plotnine: a gray bar from submitted to started, a coloured bar from started
to ended, a gray bar from ended to processed; one row per job.
``resources()`` shows each job's CPU seconds and peak memory;
``utilization()`` the running jobs and CPU cores in use over the run.
``jobs`` may be a list of job dicts, a DataFrame, or an accounting CSV path.

A chart shows only what the data holds: a facet strip or a legend appears
only when it tells jobs apart (two values or more), a colour scale lists only
the values present, jobs that never ran draw no bar and make no facet, and
where several queues mix, a job is named by its queue and id (ids restart
in every queue).
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Union

from .job import TIMES

__all__ = ["Plot", "to_dataframe", "COLUMNS", "THEMES"]

COLUMNS = ("qid", "priority", "lane", "cancelled", "exitcode", "name", "output",
           "status", "user", "host", "function")
THEMES = ("bw", "classic", "gray", "grey", "seaborn", "538", "dark", "matplotlib",
          "minimal", "xkcd", "light")
SCALES = ("fixed", "free", "free_x", "free_y")
_NUMERIC = ("cpu_user", "cpu_system", "max_rss", "max_rss_children", "runtime", "exitcode", "pid")


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(f"{name} is needed for tables and plots: pip install 'ezpq_mgr[plot]'") from None


def to_dataframe(jobs: Union[Sequence[dict], Any]):
    """A pandas DataFrame of job dicts: datetimes as datetimes, status categorical."""
    pd = _import("pandas")
    if isinstance(jobs, pd.DataFrame):
        df = jobs.copy()
    elif isinstance(jobs, str):
        df = pd.read_csv(jobs)
    else:
        df = pd.DataFrame(list(jobs))
    for col in TIMES:
        if col in df:
            df[col] = pd.to_datetime(df[col])
    for col in _NUMERIC:
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    if "status" in df:
        from .job import JobStatus
        df["status"] = pd.Categorical(df["status"], categories=[s.value for s in JobStatus])
    return df


def _label(value: Any) -> str:
    """Text for a colour/facet key: None and NaN become ''."""
    return "" if value is None or value != value else str(value)


def _labels(column):
    """A column as text keys, categorical over only the values present (in
    their order of first appearance, or the category order for a categorical
    such as ``status``), so a legend never lists what no job has."""
    pd = _import("pandas")
    text = column.astype(object).map(_label)
    if isinstance(column.dtype, pd.CategoricalDtype):
        order = [_label(c) for c in column.dtype.categories]
        present = set(text)
        order = [c for c in order if c in present] + sorted(present - set(order))
    else:
        order = list(dict.fromkeys(text))
    return pd.Categorical(text, categories=order)


def _integer_breaks(limits) -> List[int]:
    """Axis breaks on whole numbers only (job ids), about eight of them,
    spaced 1, 2 or 5 times a power of ten."""
    lo, hi = (float(x) for x in limits)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    span = max(hi - lo, 1.0)
    step = 1
    for power in range(0, 19):
        for m in (1, 2, 5):
            step = m * 10 ** power
            if span / step <= 8:
                break
        else:
            continue
        break
    first = math.ceil(lo / step) * step
    return list(range(int(first), int(math.floor(hi)) + 1, step))


def _job_keys(df):
    """What names a job on an axis: its id within one queue; ``qid:id`` as
    an ordered category (by submission) where several queues mix."""
    pd = _import("pandas")
    if "qid" not in df or df["qid"].nunique(dropna=False) <= 1:
        return df["id"], False
    order = df.sort_values(["submitted", "qid", "id"], kind="stable")
    names = order["qid"].astype(object).map(_label) + ":" + order["id"].astype(str)
    keys = df["qid"].astype(object).map(_label) + ":" + df["id"].astype(str)
    return pd.Categorical(keys, categories=list(dict.fromkeys(names))), True


class Plot:
    """Gantt chart of job timings, as in ezpq."""

    def __init__(self, jobs: Union[Sequence[dict], Any]):
        df = to_dataframe(jobs)
        if df.empty:
            raise ValueError("Plot needs at least one job")
        start = df["submitted"].min()
        for col in TIMES:
            df[col + "_offset"] = (df[col] - start).dt.total_seconds()
        self.jobs_df = df

    def resources(self, color_by: str = "function", title: Optional[str] = None, theme: str = "bw"):
        """Per-job CPU seconds (user + system) and peak memory (MiB), one bar per job."""
        self._check(color_by, None, "fixed", theme)
        gg = _import("plotnine")
        pd = _import("pandas")
        df = self.jobs_df.copy()
        df["job_key"], mixed = _job_keys(df)
        # a shell job's own peak is its command's (a child of the worker)
        peak = df["max_rss"]
        if "max_rss_children" in df:
            peak = pd.concat([df["max_rss"], df["max_rss_children"]], axis=1).max(axis=1, skipna=True)
        cpu = df[["job_key", color_by]].assign(metric="CPU seconds", value=df["cpu_user"] + df["cpu_system"])
        mem = df[["job_key", color_by]].assign(metric="peak RSS (MiB), the larger of job and children",
                                              value=peak / 2**20)
        long = pd.concat([cpu, mem], ignore_index=True).dropna(subset=["value"])
        if long.empty:
            raise ValueError("no job has CPU or memory figures (thread jobs have no max_rss)")
        long[color_by] = _labels(long[color_by])
        many = long[color_by].nunique() > 1
        labs = {"x": "queue:job id" if mixed else "job id", "y": "", "fill": color_by}
        if title is not None:
            labs["title"] = title
        plot = (gg.ggplot(long, gg.aes(x="job_key", y="value", fill=color_by))
                + gg.geom_col(show_legend=many)
                + gg.facet_wrap("metric", ncol=1, scales="free_y")
                + gg.labs(**labs)
                + getattr(gg, "theme_" + theme)())
        if not mixed:
            plot += gg.scale_x_continuous(breaks=_integer_breaks)
        return plot

    def utilization(self, points: int = 400, title: Optional[str] = None, theme: str = "bw"):
        """Running jobs and CPU cores in use over the run (a job's CPU seconds
        spread evenly over its runtime)."""
        self._check("qid", None, "fixed", theme)
        gg = _import("plotnine")
        pd = _import("pandas")
        df = self.jobs_df.dropna(subset=["started_offset", "ended_offset"])
        if df.empty:
            raise ValueError("no job has run")
        end = float(df["ended_offset"].max())
        grid = [end * i / (points - 1) for i in range(points)]
        cpu = (df["cpu_user"].fillna(0) + df["cpu_system"].fillna(0)).tolist()
        spans = list(zip(df["started_offset"], df["ended_offset"], cpu))
        running, cores = [], []
        for t in grid:
            live = [(a, b, c) for a, b, c in spans if a <= t < b]
            running.append(len(live))
            cores.append(sum(c / (b - a) for a, b, c in live if b > a))
        long = pd.DataFrame({
            "time": grid * 2,
            "value": running + cores,
            "metric": ["running jobs"] * points + ["CPU cores in use"] * points,
        })
        labs = {"x": "time since first submit (s)", "y": ""}
        if title is not None:
            labs["title"] = title
        return (gg.ggplot(long, gg.aes(x="time", y="value"))
                + gg.geom_step(color="steelblue")
                + gg.facet_wrap("metric", ncol=1, scales="free_y")
                + gg.labs(**labs)
                + getattr(gg, "theme_" + theme)())

    def _check(self, color_by: str, facet_by: Optional[str], facet_scale: str, theme: str) -> None:
        for arg, value in (("color_by", color_by), ("facet_by", facet_by)):
            if value is not None and value not in COLUMNS:
                raise ValueError(f"{arg} must be one of {COLUMNS}, not {value!r}")
        if facet_scale not in SCALES:
            raise ValueError(f"facet_scale must be one of {SCALES}, not {facet_scale!r}")
        if theme not in THEMES:
            raise ValueError(f"theme must be one of {THEMES}, not {theme!r}")

    def build(self, color_by: str = "qid", facet_by: Optional[str] = "qid", facet_scale: str = "fixed",
              show_legend: bool = True, bar_width: float = 1, title: Optional[str] = None,
              color_pal: Optional[List[str]] = None, theme: str = "bw"):
        """The plotnine ggplot; ``.save(path)`` it or display it."""
        self._check(color_by, facet_by, facet_scale, theme)
        gg = _import("plotnine")
        # a job that never started draws no bar: it makes no row, colour or facet
        df = self.jobs_df.dropna(subset=["started_offset"]).copy()
        if df.empty:
            raise ValueError("no job has run: nothing to draw")
        for col in {color_by, facet_by} - {None}:
            df[col] = _labels(df[col])
        if facet_by is not None and df[facet_by].nunique() <= 1:
            facet_by = None   # one strip naming one value tells nothing
        df["job_key"], mixed = _job_keys(df) if facet_by != "qid" else (df["id"], False)
        many_colors = df[color_by].nunique() > 1
        waiting = df.dropna(subset=["submitted_offset", "started_offset"])
        running = df.dropna(subset=["started_offset", "ended_offset"])
        after = df.dropna(subset=["ended_offset", "processed_offset"])
        labs = {"x": "seconds since the first job was submitted",
                "y": "queue:job id" if mixed else "job id", "color": color_by}
        if title is not None:
            labs["title"] = title
        plot = (
            gg.ggplot(df, gg.aes(y="job_key"))
            + gg.geom_segment(gg.aes(x="submitted_offset", xend="started_offset", yend="job_key"),
                              data=waiting, color="gray", size=bar_width, alpha=0.3)
            + gg.geom_segment(gg.aes(x="started_offset", xend="ended_offset", yend="job_key",
                                     color=color_by),
                              data=running, size=bar_width, show_legend=bool(show_legend) and many_colors)
            + gg.geom_segment(gg.aes(x="ended_offset", xend="processed_offset", yend="job_key"),
                              data=after, color="gray", size=bar_width, alpha=0.3)
            + gg.labs(**labs)
            + getattr(gg, "theme_" + theme)()
            + gg.theme(panel_border=gg.element_blank(), axis_line=gg.element_line(color="black"),
                       panel_grid_major_y=gg.element_blank(), panel_grid_minor_y=gg.element_blank())
        )
        if facet_by is not None:
            plot += gg.facet_grid(rows=facet_by, labeller="label_both", scales=facet_scale)
        if not mixed:
            plot += gg.scale_y_continuous(breaks=_integer_breaks)
        n_colors = df[color_by].nunique()
        if color_pal is None:
            plot += gg.scale_color_hue(h=0.65)
        else:
            if len(color_pal) < n_colors:
                raise ValueError(f"color_pal has {len(color_pal)} colours; {color_by!r} needs {n_colors}")
            plot += gg.scale_color_manual(values=list(color_pal[:n_colors]))
        return plot
