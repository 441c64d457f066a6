"""reports.plots: every function draws on the given Axes, returns it, labels axes with units and uses
the fixed algorithm colours."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from reports import panels, plots


@pytest.fixture
def ax():
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def test_fixed_colours():
    assert plots.color("treegrpo") == plots.COLORS["treegrpo"] == plots.color("treegrpo k=3 d=2")
    assert len({plots.color(a) for a in ("ddpo", "dancegrpo", "mixgrpo", "treegrpo", "grpo")}) == 5
    assert plots.color("mystery") == plots.color("mystery")  # stable for unknown names
    st = plots.styles(["treegrpo k=2", "treegrpo k=3", "ddpo"])
    assert st["ddpo"]["color"] == plots.COLORS["ddpo"]
    assert st["treegrpo k=2"]["color"] != st["treegrpo k=3"]["color"]  # shades of one hue


def test_grid_colours_one_hue_per_k_lightness_per_d():
    from matplotlib.colors import rgb_to_hsv, to_rgb

    labels = [f"treegrpo k={k} d={d}" for k in (2, 3, 4) for d in (1, 2, 3)]
    st = plots.styles(labels)
    hsv = {lab: rgb_to_hsv(to_rgb(st[lab]["color"])) for lab in labels}
    assert len({st[lab]["color"] for lab in labels}) == 9
    for k in (2, 3, 4):  # one hue per k, getting lighter with d (value up or saturation down)
        row = [hsv[f"treegrpo k={k} d={d}"] for d in (1, 2, 3)]
        assert max(abs(h[0] - row[0][0]) for h in row) < 0.02
        light = [h[2] - h[1] for h in row]
        assert light[0] < light[1] < light[2]
    hues = {round(float(hsv[f"treegrpo k={k} d=1"][0]), 2) for k in (2, 3, 4)}
    assert len(hues) == 3  # distinct hues across k
    for d in (1, 2, 3):  # the same line style and marker per d
        assert len({(st[f"treegrpo k={k} d={d}"]["linestyle"], st[f"treegrpo k={k} d={d}"]["marker"])
                    for k in (2, 3, 4)}) == 1
    ctrl = plots.styles(["dancegrpo", "dancegrpo-aa", "dancegrpo-frozen"])
    assert ctrl["dancegrpo-frozen"]["color"] == plots.FROZEN_COLOR and ctrl["dancegrpo-aa"]["linestyle"] == ":"
    assert ctrl["dancegrpo"]["color"] == plots.COLORS["dancegrpo"]


def test_learning_curves(ax):
    curves = pd.DataFrame({"label": ["ddpo"] * 3, "x": [0, 1, 2], "value": [0.1, 0.2, 0.3],
                           "lo": [0.0, 0.1, 0.2], "hi": [0.2, 0.3, 0.4], "n": 3, "evaluated": [True, False, True]})
    assert plots.learning_curves(ax, curves, "scored samples (images)", "reward",
                                 targets=[("50% of the gain", 0.25)]) is ax
    assert ax.get_xlabel() == "scored samples (images)"
    assert ax.lines[0].get_color() == plots.COLORS["ddpo"]
    marks = ax.lines[1]  # markers only at the evaluated points
    assert marks.get_linestyle() == "None" and list(marks.get_xdata()) == [0, 2]
    assert ax.lines[2].get_ydata()[0] == 0.25 and ax.texts[0].get_text() == "50% of the gain"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ddpo (n=3)"]
    fig2, ax2 = plt.subplots()
    plots.learning_curves(ax2, curves, "x", "y", legend=False)
    assert ax2.get_legend() is None
    top = plots.figure_legend(fig2, plots.curve_handles(["ddpo"], curves))
    assert fig2.legends[0].get_texts()[0].get_text() == "ddpo (n=3)" and top < 0.945
    plt.close(fig2)


def test_pareto_front_filled_dominated_hollow(ax):
    pts = pd.DataFrame({"label": ["ddpo", "treegrpo"], "cost": [2.0, 1.0], "value": [0.1, 0.3],
                        "lo": [0.0, 0.2], "hi": [0.2, 0.4], "front": [False, True]})
    assert plots.pareto(ax, pts, "seconds per training iteration (s)", "reward") is ax
    from matplotlib.collections import PathCollection

    faces = [c.get_facecolors()[0][:3] for c in ax.collections if isinstance(c, PathCollection)]
    assert len(faces) == 2
    assert np.allclose(faces[0], 1.0)  # ddpo dominated: hollow (white face)
    assert np.allclose(faces[1], matplotlib.colors.to_rgb(plots.COLORS["treegrpo"]))  # front: filled
    assert ax.get_xlabel().endswith("(s)")


def test_phase_breakdown_heatmap_grid_and_hacking(ax, tmp_path):
    phases = pd.DataFrame({"label": ["ddpo", "treegrpo"], "t_rollout_s": [1.0, 2.0], "t_reward_s": [0.1, 0.1],
                           "t_advantage_s": [0.0, 0.0], "t_update_s": [0.5, 0.4]})
    assert plots.phase_breakdown(ax, phases) is ax
    assert "seconds" in ax.get_xlabel()
    fig, axes = plt.subplots(1, 3)
    tab = pd.DataFrame([[1.0, 2.0], [3.0, np.nan]], index=pd.Index([1, 2], name="d"),
                       columns=pd.Index([2, 3], name="k"))
    assert plots.heatmap(axes[0], tab, "reward", "reward") is axes[0]
    assert (axes[0].get_xlabel(), axes[0].get_ylabel()) == ("k", "d")
    from PIL import Image

    Image.new("RGB", (8, 4), (255, 0, 0)).save(tmp_path / "a.png")
    # a 2 x 2 grid of 4 x 4 tiles (2-px borders), one prompt per row
    Image.new("RGB", (12, 12), (255, 0, 0)).save(tmp_path / "g.png")
    assert panels.sample_image(axes[1], tmp_path / "g.png", ["p one", "p one", "p two", "p two"], title="it 0") is axes[1]
    assert [t.get_text() for t in axes[1].get_yticklabels()] == ["p one", "p two"]
    assert panels.sample_image(axes[1], tmp_path / "missing.png", []) is axes[1]
    ev = pd.DataFrame({"iteration": [0, 1, 2], "eval/tr": [1, 2, 3], "eval/ho": [3, 2, 1]})
    assert plots.reward_hacking_panel(axes[2], ev, "eval/tr", ["eval/ho"], [False, False, True]) is axes[2]
    assert plots.flag_spans([0, 1, 2, 3], [False, False, True, True]) == [(0.0, 3.0)]
    plt.close(fig)


def test_colours_and_order_come_from_the_registry():
    from bench.registry import ALGORITHMS
    from reports.load import order_labels

    # every registered algorithm has its own colour, set on its registry entry
    assert all(e.color for e in ALGORITHMS.values())
    assert {a: plots.color(a) for a in ALGORITHMS} == {a: e.color for a, e in ALGORITHMS.items()}
    assert len({e.color for e in ALGORITHMS.values()}) == len(ALGORITHMS)
    # tables and legends follow the registry's order, plug-ins after, controls last
    names = list(ALGORITHMS)
    shuffled = [(a, a) for a in reversed(names)] + [("mine", "mine"), ("dancegrpo-aa", "dancegrpo")]
    assert order_labels(shuffled) == names + ["mine", "dancegrpo-aa"]


def test_reference_defaults_arm_is_drawn_as_a_variant_of_its_algorithm():
    assert plots.algo_of("dancegrpo-default") == "dancegrpo"
    st = plots.styles(["dancegrpo", "dancegrpo-default"])
    assert st["dancegrpo"]["color"] != st["dancegrpo-default"]["color"]
    assert st["dancegrpo"]["linestyle"] != st["dancegrpo-default"]["linestyle"]
    hue = [matplotlib.colors.rgb_to_hsv(matplotlib.colors.to_rgb(st[x]["color"]))[0] for x in st]
    assert abs(hue[0] - hue[1]) < 0.02  # one hue, two shades
