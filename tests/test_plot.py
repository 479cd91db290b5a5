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
    big = res.data[(res.data["metric"] == "peak RSS (MiB)")]["value"].max()
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
