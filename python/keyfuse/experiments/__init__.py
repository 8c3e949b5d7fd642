"""The papers' experiments, built only on keyfuse's public functions.

Each module runs one experiment end to end and formats its figures; the command line
(``keyfuse evaluate fusion``) and the scripts in ``benches/`` call them.

* :mod:`keyfuse.experiments.fusion_table1`: fusion of keypoints and CNN vectors (the
  fusion paper's Table 1, Fig. 2 and 3).
* :mod:`keyfuse.experiments.segmentation`: keypoint-transfer segmentation against a
  multi-atlas registration baseline.
* :mod:`keyfuse.experiments.cohort`: family identification by the soft Jaccard index
  against the reference matcher's voting.
"""
