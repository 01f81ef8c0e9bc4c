"""The figures read back through matplotlib's objects: the corruption plot (families on rows, levels 1-5 on every
panel, the baseline dashed, one legend saying how many images, 95% bands) and the distort grid's title."""

import math

import pytest

from timm_icl.cli import main
from timm_icl.distortions import IMAGENET_C_10
from timm_icl.eval import format_corruption_table, plots
from timm_icl.eval.stats import wilson_interval

KINDS = ["noise", "shot_noise", "defocus_blur", "brightness", "jpeg"]


def _result(clean, drop, count=500):
    """Conditions of IMAGENET_C_10 for KINDS, top-1 falling by ``drop`` per level, with counts."""
    conds = {"clean": {"kind": "clean", "sigma": 0.0, "top1": clean, "correct": round(clean * count), "count": count}}
    for d in IMAGENET_C_10:
        if d.kind in KINDS:
            level = [c.sigma for c in IMAGENET_C_10.of_kind(d.kind)].index(d.sigma) + 1
            top1 = round(clean - drop * level, 3)
            conds[d.name] = {"kind": d.kind, "sigma": d.sigma, "top1": top1, "correct": round(top1 * count)}
            conds[d.name]["count"] = count
    text = " ".join(g for g in IMAGENET_C_10.to_text().split() if g.partition(":")[0] in KINDS)
    return {"conditions": conds, "distortions": text, "dataset": "fashion-mnist", "split": "test"}


@pytest.fixture
def figures(monkeypatch):
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)  # keep the figure to inspect it
    return kept


def test_corruption_plot_families_levels_baseline_one_legend(tmp_path, figures):
    base, ft, icl = _result(0.9, 0.1), _result(0.88, 0.05), _result(0.88, 0.04)
    plots.plot_accuracy_vs_sigma({"FT": ft, "ICL": icl}, tmp_path / "c.png", reference=base, reference_name="base")
    (fig,) = figures
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["Gaussian noise", "shot noise", "defocus blur", "brightness", "JPEG"]
    # one row per family: noise (2 panels), blur, weather, digital; the family names the row
    rows = [ax.get_subplotspec().rowspan.start for ax in visible]
    assert rows == [0, 0, 1, 2, 3]
    assert [ax.get_ylabel() for ax in visible if ax.get_subplotspec().colspan.start == 0] == [
        f"{f}\ntop-1 accuracy" for f in ("noise", "blur", "weather", "digital")
    ]
    for ax in visible:
        assert list(ax.get_xticks()) == [0, 1, 2, 3, 4, 5] and ax.get_legend() is None
        lines = [line for line in ax.get_lines() if line.get_label() in ("base", "FT", "ICL")]
        assert [line.get_label() for line in lines] == ["base", "FT", "ICL"]
        assert all(list(line.get_xdata()) == [0, 1, 2, 3, 4, 5] for line in lines)
        assert lines[0].get_linestyle() == "--" and lines[0].get_color() == "k"
        assert len(ax.collections) == 3  # a 95% band per line
    noise = visible[0]
    assert [t.get_text() for t in noise.get_xticklabels()] == [
        "clean",
        "1\n20.4",
        "2\n30.6",
        "3\n45.9",
        "4\n66.3",
        "5\n96.9",
    ]
    assert noise.get_xlabel() == "ImageNet-C level (below: σ, 0-255)"
    assert [t.get_text() for t in visible[1].get_xticklabels()] == ["clean", "1", "2", "3", "4", "5"]
    # the band of FT is the Wilson interval of each condition's counts
    band = noise.collections[1].get_paths()[0].vertices
    low = wilson_interval(round(0.83 * 500), 500)[0]  # level 1: 0.88 - 0.05
    assert any(math.isclose(x, 1.0) and math.isclose(y, low) for x, y in band)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["base", "FT", "ICL"]
    assert legend.get_title().get_text().startswith("500 images of fashion-mnist test per condition; shaded: 95%")


def test_paper_set_stays_on_sigma_and_seeds_are_said(tmp_path, figures):
    def paper(shift):
        conds = {"clean": {"kind": "clean", "sigma": 0.0, "top1": 0.9 + shift, "correct": 9, "count": 10}}
        for s in (20, 40):
            conds[f"noise{s}"] = {"kind": "noise", "sigma": float(s), "top1": 0.8 + shift, "correct": 8, "count": 10}
        return {"conditions": conds}

    plots.plot_accuracy_vs_sigma({"a": [paper(0), paper(0.02)]}, tmp_path / "p.png", title="x " * 80)
    (fig,) = figures
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert ax.get_xlabel() == "noise sigma (0-255 pixel units)" and list(ax.get_lines()[0].get_xdata()) == [0, 20, 40]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["a (2 seeds)"] and "std over" in legend.get_title().get_text()
    assert len(fig._suptitle.get_text().splitlines()) > 1  # a long title is wrapped to the figure's width


def test_distort_grid_title_fits_and_does_not_overprint(tmp_path, figures):
    import skimage

    image = __import__("pathlib").Path(skimage.__file__).parent / "data" / "chelsea.png"
    assert (
        main(["distort", str(image), "--distortions", "imagenet-c-10", "--size", "32", "-o", str(tmp_path / "g.png")])
        == 0
    )
    (fig,) = figures
    assert fig._suptitle.get_text() == "chelsea.png, 32 px: imagenet-c-10 (10 ImageNet-C corruptions, levels 1-5)"
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    whole = fig.bbox
    assert whole.x0 <= title.x0 and title.x1 <= whole.x1 and title.y1 <= whole.y1  # inside the figure
    for ax in fig.axes:  # above every panel and every panel title
        assert title.y0 >= ax.title.get_window_extent(renderer).y1 - 0.5
        assert title.y0 >= ax.get_window_extent(renderer).y1
    first = fig.axes[:6]
    assert [ax.title.get_text() for ax in first] == ["clean"] + [
        f"level {i}: σ={s:g} (0-255)" for i, s in enumerate((20.4, 30.6, 45.9, 66.3, 96.9), 1)
    ]
    assert fig.axes[6].texts[0].get_text() == "shot noise" and fig.axes[7].title.get_text() == "level 1"


def test_relative_mce_explained_when_undefined():
    base, model = _result(0.9, 0.1), _result(0.88, 0.05)
    for c in base["conditions"].values():
        if c["kind"] == "brightness":
            c["top1"] = 0.95  # the baseline loses nothing under brightness
    table = format_corruption_table({"icl": model}, base)
    assert "| **relative mCE** |  |  | undefined (see below) |" in table
    assert "the baseline loses nothing under brightness" in table and "Over the other corruptions: icl " in table


def test_eval_plot_draws_the_baseline(tmp_path, figures):
    import numpy as np
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "data" / "validation" / cls).mkdir(parents=True)
        Image.fromarray(np.full((30, 30, 3), 90, np.uint8)).save(tmp_path / "data" / "validation" / cls / "0.png")
    args = ["eval", "vgg_tiny", "--no-pretrained", "--num-classes", "2", "--dataset", str(tmp_path / "data")]
    args += ["--distortions", "noise:20.4,30.6 jpeg:1,2", "-q"]
    assert main([*args, "-o", str(tmp_path / "base.json"), "--name", "plain"]) == 0
    figures.clear()
    assert main([*args, "--baseline", str(tmp_path / "base.json"), "--plot", str(tmp_path / "p.png")]) == 0
    (fig,) = [f for f in figures if f.legends]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["plain (baseline)", "vgg_tiny"]
    note = legend.get_title().get_text().replace("\n", " ")
    assert note.startswith("2 images of data validation per condition")  # the folder's name, not its path
    assert fig._suptitle.get_text() == "vgg_tiny on data validation"  # the folder's name, not its path
    for ax in [a for a in fig.axes if a.get_visible()]:
        assert [line.get_label() for line in ax.get_lines()][:2] == ["plain (baseline)", "vgg_tiny"]
