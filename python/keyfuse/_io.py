"""Small file helpers: subject ids from file names, and atomic writes (nothing on disk
is ever half-written)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# volume files that folders are searched for (keyfuse.formats reads these and more: DICOM
# directories and single 2D images are named directly)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".nrrd", ".nhdr", ".mha", ".mhd")
KEY_SUFFIXES = (".kfk", ".key")


def subject_id_from_path(path: str | os.PathLike[str]) -> str:
    """The subject id a file stands for: its name without a known suffix.

    The image suffixes of ``IMAGE_SUFFIXES``, ``.kfk`` and ``.key`` are removed whole
    (``sub-01.nii.gz`` → ``sub-01``); any other name loses its last suffix only
    (``scan.v2.png`` → ``scan.v2``); a directory (a DICOM series) is its whole name.
    """
    p = Path(path)
    if p.is_dir():
        return p.name
    for suffix in (*IMAGE_SUFFIXES, *KEY_SUFFIXES):
        if p.name.endswith(suffix):
            return p.name[: -len(suffix)]
    return p.stem


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The temporary name keeps the target's suffixes (so writers that look at ``.nii.gz``
    still compress); on error it is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; give the file the permissions an ordinary open() would
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
