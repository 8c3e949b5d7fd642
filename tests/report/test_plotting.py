"""Image-level tests of keyfuse.plotting: the pixels land where the data says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _report_data as data
import numpy as np
import pytest
from matplotlib.colors import rgb_to_hsv, to_rgb

import keyfuse as kf
from keyfuse import plotting as P
from keyfuse.errors import InvalidArgumentError
from keyfuse.plotting.anatomy import _edge_levels, _label_colour
from keyfuse.reports import LoadedSegmentation

# the shared data (cached once per run), as fixtures


@pytest.fixture(scope="module")
def mni() -> Any:
    return data.mni()


@pytest.fixture(scope="module")
def mni_kps() -> Any:
    return data.mni_kps()


@pytest.fixture(scope="module")
def cohort() -> Any:
    return data.cohort()


def render(fig: Any) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1], row 0 at the top."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float64) / 255.0


def pixel(fig: Any, ax: Any, h: float, v: float, rgb: np.ndarray) -> np.ndarray:
    """The rendered colour at data point (h, v) of ``ax``."""
    x, y = ax.transData.transform((h, v))
    height = rgb.shape[0]
    return rgb[round(height - y - 0.5), round(x - 0.5)]


def image_axes(fig: Any) -> list[Any]:
    return [ax for ax in fig.axes if ax.images]


# ------------------------------------------------------------------------- keypoints


def test_keypoint_dots_have_their_polarity_colour(mni: Any, mni_kps: Any) -> None:
    fig = P.plot_keypoints(mni, mni_kps)
    rgb = render(fig)
    centre = P.brain_centre(mni)
    r = np.sqrt(3.0) * mni_kps.scale
    checked = ok = 0
    for ax, (cut, ha, va) in zip(image_axes(fig), [(0, 1, 2), (1, 0, 2), (2, 0, 1)], strict=True):
        shown = np.flatnonzero(np.abs(mni_kps.xyz[:, cut] - centre[cut]) < r)
        for n in shown:
            want = np.asarray(to_rgb(P.POLARITY_COLOURS[1 if mni_kps.polarity[n] > 0 else -1]))
            got = pixel(fig, ax, mni_kps.xyz[n, ha], mni_kps.xyz[n, va], rgb)
            checked += 1
            ok += bool(np.abs(got - want).max() < 0.08)
    assert checked >= 20
    assert ok / checked > 0.9  # a few dots hide under a neighbour of the other polarity
    # no keypoints: no keypoint colour anywhere on the slices
    empty = P.plot_keypoints(mni, mni_kps[np.zeros(len(mni_kps), bool)])
    rgb0 = render(empty)
    for ax in image_axes(empty):
        x0, y0, x1, y1 = ax.get_window_extent().extents.astype(int)
        patch = rgb0[rgb0.shape[0] - y1 : rgb0.shape[0] - y0, x0:x1]
        for colour in P.POLARITY_COLOURS.values():
            assert (np.abs(patch - np.asarray(to_rgb(colour))).max(axis=-1) < 0.08).sum() == 0


def test_neurological_and_radiological_conventions(mni: Any, mni_kps: Any) -> None:
    left = mni_kps[np.flatnonzero(mni_kps.xyz[:, 0] < -20)[:1]]  # one left-hemisphere keypoint
    cut = (0.0, 0.0, float(left.xyz[0, 2]))
    for radiological, side in ((False, -1), (True, 1)):
        fig = P.plot_keypoints(mni, left, cut_coords=cut, radiological=radiological)
        axial = image_axes(fig)[2]
        x_kp = axial.transData.transform((left.xyz[0, 0], left.xyz[0, 1]))[0]
        x_mid = axial.transData.transform((0.0, 0.0))[0]
        assert np.sign(x_kp - x_mid) == side
        texts = " ".join(t.get_text() for t in fig.texts)
        assert ("radiological convention" if radiological else "neurological convention") in texts
        letters = [t.get_text() for t in axial.texts]
        assert letters == (["R", "L"] if radiological else ["L", "R"])


def test_default_cuts_go_through_the_brain(mni: Any) -> None:
    c = P.brain_centre(mni)
    # the MNI origin is near the anterior commissure: the head's centre is within ~3 cm
    assert np.all(np.abs(c) < 30)
    with pytest.raises(InvalidArgumentError, match="cut_coords"):
        P.plot_keypoints(mni, kf.KeypointSet.empty(), cut_coords=(1, 2))


# ------------------------------------------------------------------------- alignment


def test_alignment_edges_sit_on_the_fixed_image_after_align(mni: Any, mni_kps: Any) -> None:
    """The moving scan is the template shifted by (12, -8, 6) mm: before alignment its
    edges are off the fixed image's iso-contours, after kf.align they are on them."""
    from scipy import ndimage

    shift = np.eye(4)
    shift[:3, 3] = (12.0, -8.0, 6.0)
    moving = kf.Image(mni.data, shift @ mni.affine)
    al = kf.align(mni_kps.transformed(shift), mni_kps, device="cpu")
    assert np.allclose(al.translation, -shift[:3, 3], atol=1.5)
    fig = P.plot_alignment(moving, mni, al)
    rgb = render(fig)
    levels = np.asarray(_edge_levels(moving))
    smooth = ndimage.gaussian_filter(np.asarray(mni.data, np.float64), 0.5)
    inv = np.linalg.inv(mni.affine)
    errors = []
    axes = image_axes(fig)
    for ax in (axes[2], axes[5]):  # axial: before, after
        x0, y0, x1, y1 = ax.get_window_extent().extents.astype(int)
        sub = rgb[rgb.shape[0] - y1 : rgb.shape[0] - y0, x0:x1]
        rows, cols = np.nonzero(np.abs(sub - np.asarray(to_rgb(P.EDGE_COLOUR))).max(-1) < 0.06)
        assert rows.size > 200
        disp = np.c_[x0 + cols + 0.5, y1 - rows - 0.5]
        hv = ax.transData.inverted().transform(disp)
        world = np.c_[hv, np.full(len(hv), P.brain_centre(mni)[2])]
        ijk = world @ inv[:3, :3].T + inv[:3, 3]
        vals = ndimage.map_coordinates(smooth, ijk.T, order=1)
        errors.append(np.median(np.min(np.abs(vals[:, None] - levels[None, :]), axis=1)))
    before, after = errors
    assert after < 0.35 * before


# ---------------------------------------------------------------------- segmentation


def test_segmentation_overlay_colours_follow_the_label_map(cohort: Any) -> None:
    from scipy import ndimage

    img, lab = cohort.image(0), cohort.label_map(0)
    labels = np.asarray(lab.data).astype(int)
    values = sorted(int(v) for v in np.unique(labels) if v)
    fig = P.plot_segmentation(img, lab, label_names=cohort.label_names, probabilities=False)
    rgb = render(fig)
    ax = image_axes(fig)[2]  # axial through the head centre
    z = P.brain_centre(img)[2]
    inv = np.linalg.inv(img.affine)
    hues = {v: rgb_to_hsv(np.asarray(to_rgb(_label_colour(v, values))))[0] for v in values}
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    good = total = 0
    core = {v: ndimage.binary_erosion(labels == v, iterations=1) for v in values}
    for h in np.linspace(x0, x1, 60):
        for v in np.linspace(y0, y1, 60):
            ijk = np.rint(inv[:3, :3] @ (h, v, z) + inv[:3, 3]).astype(int)
            if np.any(ijk < 0) or np.any(ijk >= labels.shape):
                continue
            want = next((k for k in values if core[k][tuple(ijk)]), None)
            if want is None:
                continue
            hsv = rgb_to_hsv(pixel(fig, ax, h, v, rgb))
            d = abs(hsv[0] - hues[want])
            total += 1
            good += bool(min(d, 1 - d) < 0.06 and hsv[1] > 0.2)
    assert total > 150
    assert good / total > 0.9
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [f"{v}: {cohort.label_names[v]}" for v in values]


def test_probability_maps_one_panel_per_label(cohort: Any) -> None:
    from scipy import ndimage

    lab = np.asarray(cohort.label_map(0).data).astype(int)
    probs = {
        v: ndimage.gaussian_filter((lab == v).astype(np.float32), 1.0) for v in (1, 2, 3, 4, 5)
    }
    seg = LoadedSegmentation(lab, cohort.image(0).affine, probs)
    fig = P.plot_segmentation(cohort.image(0), seg, label_names=cohort.label_names)
    panels = image_axes(fig)
    assert len(panels) == 3 + 5  # slices, then one probability map per label
    assert len(fig.axes) == 3 + 5 + 1  # and the colour bar
    assert panels[3].get_title().startswith("p(left_gm)")


# ---------------------------------------------------------- matches, montage, curves


def test_matches_lines_coloured_by_inlier(mni: Any, mni_kps: Any, cohort: Any) -> None:
    from matplotlib.patches import ConnectionPatch

    kps = kf.extract(cohort.image(0), device="cpu")
    al = kf.align(kps, mni_kps, device="cpu")
    fig = P.plot_matches(cohort.image(0), kps, mni, mni_kps, al.matches, inliers=al.inliers)
    lines = [a for a in fig.artists if isinstance(a, ConnectionPatch)]
    assert len(lines) == min(80, len(al.matches))
    greens = sum(np.allclose(c.get_edgecolor()[:3], to_rgb("#3cb44b")) for c in lines)
    assert greens == int(al.inliers[np.argsort(-al.matches.p, kind="stable")[:80]].sum())


def test_retrieval_montage(cohort: Any) -> None:
    hits = [(cohort.image(i), cohort.subjects[i], 0.5 - 0.1 * i, "F", i == 1) for i in (1, 2, 3)]
    fig = P.plot_retrieval(cohort.image(0), hits, query_id=cohort.subjects[0])
    axes = image_axes(fig)
    assert len(axes) == 4
    assert axes[1].get_title() == f"#1 {cohort.subjects[1]}\n0.400  F"
    assert np.allclose(axes[1].spines["top"].get_edgecolor()[:3], to_rgb("#3cb44b"))
    assert np.allclose(axes[2].spines["top"].get_edgecolor()[:3], to_rgb("#e6194b"))
    with pytest.raises(InvalidArgumentError):
        P.plot_retrieval(cohort.image(0), [])


def test_roc_and_pr_curves_and_saving(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = y + rng.normal(0, 0.8, 300)
    perfect = (y.astype(float), y)
    roc = P.plot_roc({"noisy": (s, y), "perfect": perfect})
    texts = [t.get_text() for t in roc.axes[0].get_legend().get_texts()]
    assert texts[0] == f"noisy (AUC {kf.evaluate.roc_auc(s, y):.3f})"
    assert texts[1] == "perfect (AUC 1.000)"
    x, yy = roc.axes[0].lines[1].get_data()
    assert np.any((x == 0) & (yy == 1))  # the perfect curve passes through (0, 1)
    pr = P.plot_precision_recall({"noisy": (s, y)})
    label = pr.axes[0].get_legend().get_texts()[0].get_text()
    assert label == f"noisy (AP {kf.evaluate.average_precision(s, y):.3f})"
    png = P.save_figure(pr, tmp_path / "pr.png")
    svg = P.save_figure(roc, tmp_path / "roc.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in svg.read_bytes()[:2000]
    with pytest.raises(InvalidArgumentError, match=r"\.png"):
        P.save_figure(roc, tmp_path / "roc.gif")
    with pytest.raises(InvalidArgumentError):
        P.plot_roc({})


def test_segmentation_overlay_beside_the_nifti(cohort: Any, tmp_path: Path) -> None:
    out = P.save_segmentation_overlay(
        cohort.image(0), cohort.label_map(0), tmp_path / "sub_labels.nii.gz"
    )
    assert out == tmp_path / "sub_labels_overlay.png"
    assert out.read_bytes()[:4] == b"\x89PNG"
