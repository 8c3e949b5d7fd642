"""``python -m keyfuse``: the ``keyfuse`` command line (see :mod:`keyfuse.cli`)."""

from keyfuse.cli import main

if __name__ == "__main__":
    main()
