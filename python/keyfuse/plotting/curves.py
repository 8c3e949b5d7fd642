"""ROC and precision–recall curves of pair scores."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy.typing as npt

from keyfuse.errors import InvalidArgumentError
from keyfuse.plotting._slices import _new_figure

# ----------------------------------------------------------------------------- curves


Curves = Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]]


def plot_roc(curves: Curves, *, title: str = "ROC", ax: Any = None) -> Any:
    """ROC curves, one per entry ``name → (scores, labels)``; the legend gives each AUC.
    Returns the figure (draws into ``ax`` when given)."""
    from keyfuse.evaluate import roc_auc, roc_curve

    if not curves:
        raise InvalidArgumentError("plot_roc needs at least one curve")
    fig, ax = _curve_axes(ax)
    for name, (scores, labels) in curves.items():
        fpr, tpr, _ = roc_curve(scores, labels)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(scores, labels):.3f})", lw=1.6)
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=0.8, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    _finish_curve_axes(ax, title, "lower right")
    return fig


def plot_precision_recall(
    curves: Curves, *, title: str = "precision–recall", ax: Any = None
) -> Any:
    """Precision–recall curves, one per entry ``name → (scores, labels)``; the legend
    gives each average precision, a dotted line each curve's chance level."""
    from sklearn.metrics import precision_recall_curve

    from keyfuse.evaluate import _pair_inputs, average_precision

    if not curves:
        raise InvalidArgumentError("plot_precision_recall needs at least one curve")
    fig, ax = _curve_axes(ax)
    for name, (scores, labels) in curves.items():
        s, y = _pair_inputs(scores, labels)
        prec, rec, _ = precision_recall_curve(y, s)
        (line,) = ax.step(
            rec, prec, where="post", lw=1.6, label=f"{name} (AP {average_precision(s, y):.3f})"
        )
        ax.axhline(y.mean(), color=line.get_color(), ls=":", lw=0.8)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    _finish_curve_axes(ax, title, "lower left")
    return fig


def _curve_axes(ax: Any) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    fig = _new_figure(5.0, 4.6, dark=False)
    return fig, fig.add_subplot(1, 1, 1)


def _finish_curve_axes(ax: Any, title: str, loc: str) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.grid(True, color="0.9", lw=0.6)
    ax.set_title(title, fontsize=11)
    ax.legend(loc=loc, fontsize=8)
    ax.figure.subplots_adjust(left=0.13, right=0.97, top=0.92, bottom=0.11)
