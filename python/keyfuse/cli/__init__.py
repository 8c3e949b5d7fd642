"""The ``keyfuse`` command line.

One module per command group (``extract``, ``index``, ``search`` for ``query`` and
``pairwise``, ``simulate``, ``evaluate``, ``segment``, ``demo``); the options several
commands share are declared once in :mod:`keyfuse.cli.options`. Every command has
``--help`` with examples. Bad input ends with a one-line ``Error: ...`` message and a
non-zero exit status (1; 2 for usage errors), never a traceback.

The command modules import only click and keyfuse's light modules; each command imports
the library inside its body, so ``keyfuse --help`` stays fast and a missing optional
part breaks only the commands that need it (with a clean message).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from keyfuse.cli.options import CONTEXT, cli_message
from keyfuse.errors import KeyfuseError

__all__ = ["cli", "main"]


class KeyfuseGroup(click.Group):
    """The top-level group: turns keyfuse errors, missing modules and OS errors raised
    by any command below it into one-line ``Error:`` messages."""

    def invoke(self, ctx: click.Context) -> Any:
        import warnings

        def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            click.echo(f"warning: {message}", err=True)

        previous, warnings.showwarning = warnings.showwarning, show  # one line, no source
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyfuseError as exc:
            raise click.ClickException(cli_message(str(exc))) from exc
        except ImportError as exc:  # an optional part of keyfuse or a dependency is missing
            raise click.ClickException(f"missing module: {exc}") from exc
        except OSError as exc:
            msg = f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
            raise click.ClickException(msg) from exc
        finally:
            warnings.showwarning = previous


@click.group("keyfuse", cls=KeyfuseGroup, context_settings=CONTEXT)
@click.version_option(package_name="keyfuse", prog_name="keyfuse")
def cli() -> None:
    """keyfuse: 3D keypoint signatures for indexing, retrieving and segmenting cohorts.

    \b
    A typical session:
      keyfuse simulate cohort/ --families 6          # a synthetic cohort with ground truth
      keyfuse extract cohort/images -o keys/         # keypoints, one .kfk per image
      keyfuse index build keys/ -o cohort.kfi --labels cohort/cohort.csv
      keyfuse query cohort.kfi new_scan.nii.gz -k 5  # most similar subjects
      keyfuse evaluate family cohort/ --keys keys/   # family AUC and mAP
      keyfuse demo                                   # all of it, end to end
    """


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``keyfuse`` console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="keyfuse")


def _add_commands() -> None:
    from keyfuse.cli import demo, evaluate, extract, index, report, search, segment, simulate

    for command in (
        extract.extract,
        index.index,
        search.query,
        search.pairwise,
        simulate.simulate,
        evaluate.evaluate,
        segment.segment,
        demo.demo,
        report.report,
    ):
        cli.add_command(command)


_add_commands()
