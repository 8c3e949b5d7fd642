"""Self-contained HTML reports: one page per subject, segmentation or cohort evaluation.

A :class:`Report` is a title and a list of :class:`Section` s; a section holds blocks
(figures, tables, key figures, text). :meth:`Report.write` renders one HTML file with
every image embedded as a ``data:`` URI, inline CSS and no script, so the page opens
offline, can be mailed or archived, and needs no JavaScript.

New kinds of content slot in as *section builders*: functions ``(report, ...) ->
Section`` that add one section (see :func:`keypoints_section`,
:func:`alignment_section`, :func:`neighbours_section`, :func:`segmentation_section`,
:func:`evaluation_section`, :func:`worst_cases_section`). The three ready-made reports
(:func:`subject_report`, :func:`segmentation_report`, :func:`cohort_report`) are
sequences of builders, and :func:`report` (``kf.report``) puts whichever apply on one
page.

>>> kf.report("sub-01.html", image="sub-01.nii.gz", index=kf.Index.load("cohort.kfi"))
"""

from keyfuse.reports.document import Report, Section
from keyfuse.reports.pages import (
    LoadedSegmentation,
    cohort_report,
    load_cohort_scores,
    load_segmentation,
    report,
    segmentation_report,
    subject_report,
    write_demo_report,
)
from keyfuse.reports.sections import (
    MIN_INLIERS,
    alignment_section,
    evaluation_section,
    keypoints_section,
    neighbours_section,
    segmentation_section,
    worst_cases_section,
)

__all__ = [
    "MIN_INLIERS",
    "LoadedSegmentation",
    "Report",
    "Section",
    "alignment_section",
    "cohort_report",
    "evaluation_section",
    "keypoints_section",
    "load_cohort_scores",
    "load_segmentation",
    "neighbours_section",
    "report",
    "segmentation_report",
    "segmentation_section",
    "subject_report",
    "worst_cases_section",
    "write_demo_report",
]
