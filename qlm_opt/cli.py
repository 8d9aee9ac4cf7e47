"""Command line: ``qlm-opt whatif | serve | plan | tune | profile | bound | capacity | top |
make-tiny-model``. Each command is a module of ``qlm_opt/commands/`` that exposes
``register(app)``; this module builds the app from them and runs it.

Bad input ends with a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import sys

import typer

from qlm_opt.errors import QLMError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="qlm-opt: SLO-oriented queue manager and global scheduler for LLM serving.",
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """qlm-opt: SLO-oriented queue manager and global scheduler for LLM serving."""


def _register_subcommands() -> None:
    """Commands that live in ``qlm_opt/commands/<name>.py`` expose ``register(app)``
    (``commands/common.py`` holds what they share)."""
    import importlib
    import pkgutil

    import qlm_opt.commands as pkg

    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        if mod != "common":  # what the commands share, not a command
            importlib.import_module(f"qlm_opt.commands.{mod}").register(app)


_register_subcommands()


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from typer._click import exceptions as click_exc

    try:
        rv = app(standalone_mode=False)
    except QLMError as e:
        typer.echo(f"qlm-opt: error: {e}", err=True)
        sys.exit(2)
    except click_exc.NoArgsIsHelpError:
        sys.exit(2)  # the help was printed
    except click_exc.ClickException as e:
        # One line, like every other bad input (typer would draw a box around it).
        msg = " ".join(e.format_message().split())
        hint = f" (see 'qlm-opt {_command_name()} --help')" if _command_name() else ""
        typer.echo(f"qlm-opt: error: {msg}{hint}", err=True)
        sys.exit(e.exit_code or 2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("qlm-opt: aborted", err=True)
        sys.exit(130)
    if isinstance(rv, int):
        sys.exit(rv)


def _command_name() -> str:
    known = {c.name or c.callback.__name__ for c in app.registered_commands}
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    return args[0] if args and args[0] in known else ""


if __name__ == "__main__":
    main()
