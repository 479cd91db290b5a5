"""Plots render to real PNGs from the data they should show."""

import pandas as pd
import pytest

import ezpq_mgr as ezpq
from jobs import square, touch_memory

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def jobs():
    with ezpq.Queue(2) as Q:
        for i in range(6):
            Q.put(square, i, lane=i % 2, priority=i % 3)
        Q.put(touch_memory, 30)
        Q.wait()
        out = Q.collect()
    return out


def layer_rows(plot):
    """Rows of data behind each layer (the coloured bars are layer 1)."""
    return [len(layer.geom.data) for layer in plot.layers]


def test_gantt_png_one_bar_per_job(jobs, tmp_path):
    plot = ezpq.Plot(jobs).build(facet_by="lane", color_by="priority")
    assert layer_rows(plot)[1] == len(jobs)
    path = tmp_path / "g.png"
    plot.save(str(path), verbose=False)
    assert path.read_bytes()[:8] == PNG
    built = plot.draw()  # the figure: one facet panel per lane value
    assert len(built.axes) == len({str(j["lane"]) for j in jobs})


@pytest.mark.parametrize("by", ["status", "user", "host", "qid", "exitcode", "name"])
def test_new_colour_and_facet_columns(jobs, by, tmp_path):
    plot = ezpq.Plot(jobs).build(color_by=by, facet_by=by)
    plot.save(str(tmp_path / "x.png"), verbose=False)
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG


def test_accepts_dataframe_and_csv(jobs, tmp_path):
    path = tmp_path / "log.csv"
    for j in jobs:
        ezpq.Queue.log_csv(j, str(path))
    for source in (pd.DataFrame(jobs), str(path)):
        plot = ezpq.Plot(source).build()
        assert layer_rows(plot)[1] == len(jobs)


def test_resources_and_utilization(jobs, tmp_path):
    p = ezpq.Plot(jobs)
    res = p.resources()
    assert len(res.data) == 2 * len(jobs)  # a CPU bar and a memory bar per job
    big = res.data[res.data["metric"].str.startswith("peak RSS")]["value"].max()
    assert 30 <= big < 60
    util = p.utilization(points=50)
    assert util.data[util.data["metric"] == "running jobs"]["value"].max() <= 2
    for name, plot in (("r.png", res), ("u.png", util)):
        plot.save(str(tmp_path / name), verbose=False)
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_to_dataframe_types(jobs):
    df = ezpq.to_dataframe(jobs)
    assert len(df) == len(jobs)
    assert str(df["submitted"].dtype).startswith("datetime64")
    assert isinstance(df["status"].dtype, pd.CategoricalDtype)
    assert pd.api.types.is_numeric_dtype(df["max_rss"]) and pd.api.types.is_numeric_dtype(df["cpu_user"])


def test_bad_arguments(jobs):
    p = ezpq.Plot(jobs)
    with pytest.raises(ValueError, match="color_by"):
        p.build(color_by="colour")
    with pytest.raises(ValueError, match="facet_by"):
        p.build(facet_by="nope")
    with pytest.raises(ValueError, match="theme"):
        p.build(theme="neon")
    with pytest.raises(ValueError, match="facet_scale"):
        p.build(facet_scale="loose")
    with pytest.raises(ValueError, match="color_pal"):
        p.build(color_by="priority", color_pal=["red"])
    with pytest.raises(ValueError):
        ezpq.Plot([])


def _job(qid, id, start, status="completed", ran=True, lane=None, rss=10 * 2**20, children=None):
    """A finished job's dict as a server reports it (times in seconds after t0)."""
    t0 = pd.Timestamp("2026-01-01 00:00:00")
    at = lambda s: None if s is None else (t0 + pd.Timedelta(seconds=s)).isoformat()  # noqa: E731
    return {"qid": qid, "id": id, "status": status, "lane": lane, "priority": 100,
            "submitted": at(0), "started": at(start) if ran else None,
            "ended": at(start + 1) if ran else None, "processed": at(start + 1.5) if ran else at(0.5),
            "cpu_user": 0.5 if ran else None, "cpu_system": 0.1 if ran else None,
            "max_rss": rss if ran else None, "max_rss_children": children, "name": None,
            "exitcode": 0, "user": "u", "host": "h", "function": "f", "output": None, "cancelled": False}


def _facets(plot):
    return type(plot.facet).__name__


def test_one_queue_draws_no_facet_strip_and_no_one_entry_legend():
    plot = ezpq.Plot([_job("q1", i, i) for i in range(1, 5)]).build()
    assert _facets(plot) == "facet_null"
    assert plot.layers[1].show_legend is False


def test_colour_scale_lists_only_the_statuses_present():
    jobs = [_job("q", 1, 0), _job("q", 2, 1, status="failed"), _job("q", 3, 2)]
    plot = ezpq.Plot(jobs).build(color_by="status")
    assert list(plot.data["status"].cat.categories) == ["completed", "failed"]
    assert plot.layers[1].show_legend is True


def test_job_id_axis_has_whole_number_ticks(tmp_path):
    plot = ezpq.Plot([_job("q", i, i) for i in range(1, 11)]).build()
    figure = plot.draw()
    ticks = figure.axes[0].get_yticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    assert "since the first job was submitted" in plot.labels.x


def test_queues_whose_jobs_never_ran_make_no_facet():
    jobs = [_job("a", 1, 0), _job("a", 2, 1), _job("b", 1, 0, status="cancelled", ran=False)]
    plot = ezpq.Plot(jobs).build(facet_by="qid")
    assert _facets(plot) == "facet_null"          # only queue a ran: nothing to tell apart
    assert set(plot.data["qid"]) == {"a"}
    jobs.append(_job("c", 1, 2))
    built = ezpq.Plot(jobs).build(facet_by="qid").draw()
    assert len(built.axes) == 2                    # a and c; b never ran


def test_mixed_queues_are_keyed_by_queue_and_id():
    jobs = [_job("a", 1, 0, rss=10 * 2**20), _job("b", 1, 1, rss=40 * 2**20)]
    res = ezpq.Plot(jobs).resources(color_by="qid")
    mem = res.data[res.data["metric"].str.startswith("peak RSS")]
    assert sorted(mem["job_key"].astype(str)) == ["a:1", "b:1"]   # two bars, not one stacked
    assert sorted(mem["value"]) == [10, 40]
    gantt = ezpq.Plot(jobs).build(facet_by=None)
    assert list(gantt.data["job_key"].astype(str)) == ["a:1", "b:1"]


def test_resources_show_a_shell_commands_peak():
    job = _job("q", 1, 0, rss=20 * 2**20, children=300 * 2**20)
    res = ezpq.Plot([job]).resources()
    mem = res.data[res.data["metric"].str.startswith("peak RSS")]
    assert list(mem["value"]) == [300]
