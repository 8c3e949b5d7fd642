"""Options that several ``keyfuse`` commands share, declared once.

Each is a decorator (``@device_option()``); a command that needs a different help text
passes it, the name, type and default stay the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

#: context settings of every command: ``-h`` as well as ``--help``, wide help texts
CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

#: the library's argument names → the options that set them, for error messages
CLI_NAMES: dict[str, str] = {
    "n_families": "--families",
    "family_size": "--family-size",
    "n_rescans": "--rescans",
    "resolution_mm": "--resolution",
    "n_workers": "--workers",
    "device='cuda'": "--device cuda",
    "device='auto'": "--device auto",
    "n_neighbors": "--neighbors",
    "extract_params": "--extract-param",
}


def cli_message(message: str) -> str:
    """A library error message with its argument names replaced by the CLI options."""
    import re

    for name, option in CLI_NAMES.items():
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?!\w)", option, message)
    return message


#: --search value -> the ``exact=`` argument of ``Index.search`` / ``Index.pairwise``
SEARCH_EXACT = {"auto": None, "exact": True, "forest": False}


def path_option(
    *decls: str,
    help: str,
    kind: Literal["file", "dir"] | None = None,
    exists: bool = False,
    required: bool = False,
    default: Path | None = None,
) -> Callable[[F], F]:
    """An option whose value is a :class:`~pathlib.Path`: only a file or only a folder
    (``kind``), one that must exist (``exists``); without a value, ``default``."""
    return click.option(
        *decls,
        type=click.Path(
            exists=exists, file_okay=kind != "dir", dir_okay=kind != "file", path_type=Path
        ),
        required=required,
        default=default,
        show_default=default is not None,
        help=help,
    )


def scheduler_option(default: str, help: str) -> Callable[[F], F]:
    """``--scheduler local|processes|threads|sync``: where the work runs without
    ``--dask``."""
    return click.option(
        "--scheduler",
        type=click.Choice(["local", "processes", "threads", "sync"]),
        default=default,
        show_default=True,
        help=f"Without --dask: {help}",
    )


def count_option(*decls: str, default: int, help: str) -> Callable[[F], F]:
    """An option taking a whole number ≥ 1, with its default shown."""
    return click.option(
        *decls, type=click.IntRange(min=1), default=default, show_default=True, help=help
    )


def index_option(help: str) -> Callable[[F], F]:
    """``--index INDEX``: an existing on-disk index (the ``index_path`` parameter)."""
    return path_option("--index", "index_path", exists=True, help=help)


def device_option(
    help: str = "Where the work runs: a CUDA GPU when one is usable (auto), or the CPU.",
) -> Callable[[F], F]:
    """``--device auto|cpu|cuda`` (default auto)."""
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help=help,
    )


def vectors_option() -> Callable[[F], F]:
    """--vectors: store each image's CNN vector in the index as well."""
    return click.option(
        "--vectors",
        is_flag=True,
        help="Also store each image's CNN vector (kf.CNNFeatures, keyfuse[cnn]) for "
        "'keyfuse query --by vector/fused'.",
    )


def quiet_option(help: str = "No progress bars.") -> Callable[[F], F]:
    """``-q/--quiet``."""
    return click.option("-q", "--quiet", is_flag=True, help=help)


def dask_option(
    help: str = "Run on this Dask scheduler (e.g. tcp://10.0.0.5:8786).",
) -> Callable[[F], F]:
    """``--dask ADDRESS`` (the ``dask_address`` parameter)."""
    return click.option("--dask", "dask_address", default=None, metavar="ADDRESS", help=help)


def workers_option(help: str | None = None) -> Callable[[F], F]:
    """``-j/--workers N`` (the ``n_workers`` parameter)."""
    return click.option(
        "-j", "--workers", "n_workers", type=click.IntRange(min=1), default=None, help=help
    )


def index_argument() -> Callable[[F], F]:
    """The ``INDEX`` argument: an existing on-disk index (the ``index_path`` parameter)."""
    return click.argument(
        "index_path", metavar="INDEX", type=click.Path(exists=True, path_type=Path)
    )


def search_option() -> Callable[[F], F]:
    """``--search auto|exact|forest``, for commands that search an index (see
    :data:`SEARCH_EXACT`)."""
    return click.option(
        "--search",
        type=click.Choice(list(SEARCH_EXACT)),
        default="auto",
        show_default=True,
        help="Nearest-neighbour search: exact brute force, the kd-forest, or auto (exact "
        "below the index's exact_below keypoints, 100,000 by default).",
    )


def label_table_options(f: F) -> F:
    """``--labels CSV``, ``--id-column NAME`` and ``--columns A,B``: per-subject labels
    for the entries of an index."""
    f = click.option(
        "--columns",
        default=None,
        metavar="A,B",
        help="Only these label columns (default: all but the id).",
    )(f)
    f = click.option(
        "--id-column",
        default=None,
        help="Id column of --labels (default: 'subject', else the first).",
    )(f)
    return path_option(
        "--labels",
        kind="file",
        exists=True,
        help="CSV table of per-subject labels (e.g. a cohort.csv); rows are matched "
        "to files by the id column and the file name without suffix.",
    )(f)


def simulation_options(
    *, families: int = 12, family_size: int = 3, rescans: bool = True
) -> Callable[[F], F]:
    """The shape of a simulated cohort: ``--families``, ``--family-size``, ``--rescans``
    (when ``rescans``), ``--seed``, ``--resolution``, under the names of the parameters
    they set (``n_families``, ``family_size``, ``n_rescans``, ``seed``, ``resolution_mm``;
    see :func:`keyfuse.datasets.cohort.simulate_cohort`), so a command passes them on as
    they are (after :func:`default_rescans`)."""
    options = [
        count_option("--families", "n_families", default=families, help="Simulated families."),
        count_option("--family-size", default=family_size, help="Scans per family."),
    ]
    if rescans:
        options.append(
            click.option(
                "--rescans",
                "n_rescans",
                type=click.IntRange(min=0),
                default=None,
                help="Individuals scanned twice [default: 4, or every individual of a "
                "smaller cohort].",
            )
        )
    options += [
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed."),
        click.option(
            "--resolution",
            "resolution_mm",
            type=float,
            default=1.5,
            show_default=True,
            help="Voxel size, mm.",
        ),
    ]

    def apply(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return apply


def default_rescans(cohort: dict[str, Any]) -> dict[str, Any]:
    """The :func:`simulation_options` values with ``n_rescans`` filled in: ``--rescans``
    when given, else 4 capped at the number of individuals."""
    if cohort.get("n_rescans") is None:
        cohort = {**cohort, "n_rescans": min(4, cohort["n_families"] * cohort["family_size"])}
    return cohort
