"""Figures of what keyfuse found: keypoints, matches, alignments, segmentations, retrieval.

Every function returns a :class:`matplotlib.figure.Figure` drawn with the Agg canvas
(no display, pyplot's global state untouched); :func:`save_figure` writes it as PNG, SVG
or PDF. The defaults follow nilearn's ``plot_anat``:

* slices are cut along the **world** (RAS) axes, whatever the storage orientation or
  obliquity of the scan: each plane is resampled from the voxels through the affine, so
  keypoint world coordinates (``KeypointSet.xyz``) land exactly on the drawn anatomy;
* cuts go through the centre of mass of the head (voxels above an Otsu threshold), or
  through given ``cut_coords=(x, y, z)`` in mm; each panel is titled ``x=…``/``y=…``/``z=…``;
* the **neurological** convention (the subject's left on the left of axial and coronal
  views) is the default; ``radiological=True`` mirrors them. The convention in use is
  written on the figure and the panels carry L/R, A/P letters;
* a grey background scaled to the 2nd–99.8th percentile of the head's intensities.

>>> fig = kf.plotting.plot_keypoints(img, kps)
>>> kf.plotting.save_figure(fig, "keypoints.svg")
"""

from __future__ import annotations

from keyfuse.plotting._slices import (
    EDGE_COLOUR,
    LABEL_COLOURS,
    POLARITY_COLOURS,
    brain_centre,
    figure_to_bytes,
    save_figure,
)
from keyfuse.plotting.anatomy import (
    MontagePanel,
    overlay_path,
    plot_alignment,
    plot_keypoints,
    plot_matches,
    plot_retrieval,
    plot_segmentation,
    save_segmentation_overlay,
)
from keyfuse.plotting.curves import plot_precision_recall, plot_roc

__all__ = [
    "EDGE_COLOUR",
    "LABEL_COLOURS",
    "POLARITY_COLOURS",
    "MontagePanel",
    "brain_centre",
    "figure_to_bytes",
    "overlay_path",
    "plot_alignment",
    "plot_keypoints",
    "plot_matches",
    "plot_precision_recall",
    "plot_retrieval",
    "plot_roc",
    "plot_segmentation",
    "save_figure",
    "save_segmentation_overlay",
]
