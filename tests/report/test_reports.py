"""The HTML reports: self-contained pages, checked as files and as a person sees them in
headless Chromium (no console errors, every image decodes with real content, readable
at 1280 px); a full-page screenshot of each is kept under ``test-artifacts/``."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import _report_data as data
import numpy as np
import pytest
from click.testing import CliRunner

import keyfuse as kf
from keyfuse import reports
from keyfuse.errors import InvalidArgumentError

KINDS = ("subject", "segmentation", "cohort")


# the shared data (cached once per run), as fixtures


@pytest.fixture(scope="module")
def artifacts() -> Path:
    return data.artifacts_dir()


@pytest.fixture(scope="module")
def mni() -> Any:
    return data.mni()


@pytest.fixture(scope="module")
def mni_kps() -> Any:
    return data.mni_kps()


@pytest.fixture(scope="module")
def cohort() -> Any:
    return data.cohort()


@pytest.fixture(scope="module")
def cohort_keys() -> list[Any]:
    return data.cohort_keys()


@pytest.fixture(scope="module")
def cohort_index() -> Any:
    return data.cohort_index()


@pytest.fixture(scope="module")
def cohort_scores() -> np.ndarray:
    return data.cohort_scores()


@pytest.fixture(scope="module")
def pages(
    tmp_path_factory: pytest.TempPathFactory,
    artifacts: Path,
    mni: Any,
    mni_kps: Any,
    cohort: Any,
    cohort_keys: list[Any],
    cohort_index: Any,
    cohort_scores: np.ndarray,
) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("reports")
    images = {sid: cohort.image(i) for i, sid in enumerate(cohort.subjects)}
    seg = kf.KeypointTransferSegmenter(progress=False, device="cpu").fit(
        [cohort.image(i) for i in (1, 2, 3)], [cohort.label_map(i) for i in (1, 2, 3)]
    )
    paths = {
        "subject": reports.report(
            out / "subject.html",
            image=cohort.image(0),
            keypoints=cohort_keys[0],
            atlas=mni,
            index=cohort_index,
            images=images,
        ),  # no name: the report finds the scan's own index entry and leaves it out
        "segmentation": reports.report(
            out / "segmentation.html",
            image=cohort.image(0),
            segmentation=seg.predict(cohort.image(0)),
            label_names=cohort.label_names,
        ),
        "cohort": reports.cohort_report(
            cohort, cohort_scores, keys=cohort_keys, n_subjects=1, n_worst=1, atlas=mni
        ).write(out / "cohort.html"),
    }
    for kind, path in paths.items():  # keep the pages with the screenshots
        (artifacts / f"report-{kind}.html").write_bytes(path.read_bytes())
    return paths


def _images(page: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_page_is_self_contained(pages: dict[str, Path], kind: str) -> None:
    from PIL import Image as PILImage

    page = pages[kind].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    imgs = _images(page)
    assert len(imgs) == page.count("<img ")
    assert len(imgs) >= {"subject": 4, "segmentation": 1, "cohort": 5}[kind]
    for png in imgs:
        arr = np.asarray(PILImage.open(io.BytesIO(png)).convert("RGB"), dtype=np.uint32)
        assert arr.shape[1] >= 400
        assert arr.std() > 15  # not blank
        packed = (arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2]
        assert np.unique(packed).size > 200  # real content, not a few flat colours


def test_report_contents(pages: dict[str, Path], cohort: Any, cohort_scores: np.ndarray) -> None:
    subject = pages["subject"].read_text()
    assert "Nearest subjects of" in subject and "to the atlas</h2>" in subject
    assert "sub-000 is the query itself" in subject
    assert "<td>sub-000</td>" not in subject
    seg = pages["segmentation"].read_text()
    for name in cohort.label_names.values():
        assert name in seg  # the volume table and the legend
    page = pages["cohort"].read_text()
    figures = kf.evaluate.family_report(cohort, cohort_scores)
    assert f"{figures['family_auc']:.3f}" in page
    assert "Worst cases" in page and "precision–recall" in page
    assert "its nearest scan" in page and "to the atlas</h2>" in page


def test_report_needs_something_to_show(tmp_path: Path, cohort: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="needs an image"):
        reports.report(tmp_path / "x.html")
    with pytest.raises(InvalidArgumentError, match="scores"):
        reports.report(tmp_path / "x.html", cohort=cohort)
    with pytest.raises(InvalidArgumentError, match="7×7"):
        reports.cohort_report(cohort, np.zeros((3, 3)))


# ---------------------------------------------------------------- in a real browser

_CHECK = """(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode()));
  const out = imgs.map(i => {
    const c = document.createElement('canvas');
    c.width = Math.min(i.naturalWidth, 320);
    c.height = Math.round(i.naturalHeight * c.width / i.naturalWidth);
    const g = c.getContext('2d');
    g.drawImage(i, 0, 0, c.width, c.height);
    const d = g.getImageData(0, 0, c.width, c.height).data;
    let s = 0, s2 = 0, n = 0;
    for (let k = 0; k < d.length; k += 4) {
      const y = 0.3 * d[k] + 0.59 * d[k + 1] + 0.11 * d[k + 2]; s += y; s2 += y * y; n++;
    }
    const r = i.getBoundingClientRect();
    return {w: i.naturalWidth, shown: r.width, right: r.right,
            std: Math.sqrt(Math.max(0, s2 / n - (s / n) ** 2))};
  });
  const sizes = [...document.querySelectorAll('p, td, th, figcaption, nav a, .metric div, h1, h2')]
    .map(e => parseFloat(getComputedStyle(e).fontSize));
  return {images: out, scrollWidth: document.documentElement.scrollWidth,
          viewport: document.documentElement.clientWidth, minFont: Math.min(...sizes),
          title: document.title};
})()"""


@pytest.fixture(scope="module")
def browser() -> Any:
    from _chromium import Browser, BrowserError, find_chromium

    binary = find_chromium()
    if binary is None:
        pytest.skip(
            "Chromium not found: the report browser test needs Debian's `chromium` "
            "(`make test-deps` or `apt-get install chromium`; or set KEYFUSE_CHROMIUM)"
        )
    try:
        b = Browser(binary, width=1280, height=900)
    except (OSError, BrowserError) as exc:
        pytest.skip(f"Chromium at {binary} does not start headless: {exc}")
    yield b
    b.close()


@pytest.mark.parametrize("kind", KINDS)
def test_report_in_chromium(
    browser: Any, pages: dict[str, Path], artifacts: Path, kind: str
) -> None:
    browser.open(pages[kind].resolve().as_uri())
    res = browser.evaluate(_CHECK)
    assert browser.errors() == []
    assert res["title"].startswith("keyfuse")
    assert res["images"], "no images on the page"
    for img in res["images"]:
        assert img["w"] > 0, "an image did not decode"
        assert img["std"] > 10, "an image is (nearly) uniform"
        assert img["right"] <= res["viewport"] + 0.5, "an image runs off the page"
        assert img["shown"] >= min(img["w"], 600), "an image is shrunk below legibility"
    assert res["scrollWidth"] <= 1280, "the page scrolls sideways at 1280 px"
    assert res["minFont"] >= 13
    shot = artifacts / f"report-{kind}.png"
    browser.screenshot(shot)
    assert shot.read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------- command line


def test_cli_report_segmentation_and_errors(cohort: Any, tmp_path: Path) -> None:
    from keyfuse.cli import cli
    from keyfuse.cli.report import report

    cli.add_command(report)  # as keyfuse.cli registers it
    img, lab = tmp_path / "scan.nii.gz", tmp_path / "scan_labels.nii.gz"
    cohort.image(0).save(img)
    cohort.label_map(0).save(lab)
    out = tmp_path / "seg.html"
    res = CliRunner().invoke(
        cli, ["report", "segmentation", str(img), str(lab), "-o", str(out), "--name", "5=ventr"]
    )
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(out)
    assert "ventr" in out.read_text()
    res = CliRunner().invoke(
        cli, ["report", "segmentation", str(img), str(lab), "-o", str(out), "--name", "x"]
    )
    assert res.exit_code == 2 and "VALUE=NAME" in res.output
    res = CliRunner().invoke(cli, ["report", "cohort", str(tmp_path), "-o", str(out)])
    assert res.exit_code == 1
    assert "Error:" in res.output and "cohort.csv" in res.output


def test_cli_report_cohort_and_subject(
    cohort: Any, cohort_keys: list[Any], cohort_scores: np.ndarray, mni: Any, tmp_path: Path
) -> None:
    """A demo-like output folder (cohort/ with images and cohort.csv, keys/) → the cohort
    page; a scan and its keys → the subject page."""
    import csv

    from keyfuse.cli import cli
    from keyfuse.cli.report import report
    from keyfuse.datasets.cohort import COLUMNS

    cli.add_command(report)
    root = tmp_path / "demo"
    (root / "cohort" / "images").mkdir(parents=True)
    (root / "keys").mkdir()
    rows = []
    for i, row in enumerate(cohort.table):
        cohort.image(i).save(root / "cohort" / "images" / f"{row['subject']}.nii.gz")
        cohort_keys[i].save(root / "keys" / f"{row['subject']}.kfk")
        rows.append({**row, "image": f"images/{row['subject']}.nii.gz", "labels": ""})
    with (root / "cohort" / "cohort.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    _, keys, scores = reports.load_cohort_scores(root)
    assert np.allclose(scores, cohort_scores)
    out = tmp_path / "cohort.html"
    args = ["report", "cohort", str(root), "-o", str(out), "--atlas", "none", "--worst", "1"]
    res = CliRunner().invoke(cli, [*args, "--subjects", "1"])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    rescanned = next(r["rescan_of"] for r in cohort.table if r["rescan_of"])
    assert "Worst cases" in page and f"Keypoints {rescanned}" in page  # rescans shown first
    assert f"Alignment of {rescanned} to {rescanned}-rescan, its nearest scan" in page
    # curves, one montage, keypoints, alignment check and matches with the rescan
    assert len(_images(page)) == 5
    res = CliRunner().invoke(
        cli,
        [
            "report",
            "subject",
            str(root / "cohort" / "images" / "sub-000.nii.gz"),
            "-o",
            str(tmp_path / "s.html"),
            "--keys",
            str(keys[0]),
            "--atlas",
            "none",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "Keypoints sub-000" in (tmp_path / "s.html").read_text()
