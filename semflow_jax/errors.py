"""The one error type of the project, and the wrapper that turns it into one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence


class SemFlowError(Exception):
    """A bad input (config, file, checkpoint): the message names what is wrong and what was expected."""


def tune_cpu(prog: str) -> None:
    """The command-line tools' first step, before jax starts: `cpu.tuning.tune()`, and its one start-up
    line on stdout (what was tuned, or why not). A bad SEMFLOW_* setting is one line and exit code 2."""
    from semflow_jax.cpu import tuning

    try:
        done = tuning.tune()
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{prog}: {done.summary()}", flush=True)


def run_cli(main: Callable[[Sequence[str]], None], prog: str) -> None:
    """Tunes the CPU (`tune_cpu`), parses absl flags and runs main; bad flags, bad configs and bad inputs
    exit 2 with a single line."""
    from absl import flags

    tune_cpu(prog)
    try:
        argv = flags.FLAGS(sys.argv)
        if "config" in flags.FLAGS:
            # ml_collections defers a config file's load error to first use; surface it here.
            flags.FLAGS.config.keys()
    except Exception as e:  # flags.Error, or whatever a config file's get_config raised while loading
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    _guarded(lambda: main(argv), prog)


def _guarded(main: Callable[[], int | None], prog: str) -> None:
    """Runs main and exits with its code; a SemFlowError is one line on stderr and exit code 2."""
    try:
        code = main()
    except SemFlowError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (no usage block) and exit code 2, like every other error."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run_argparse_cli(
    parser: argparse.ArgumentParser,
    main: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
) -> None:
    """Tunes the CPU (`tune_cpu`), parses argv (default sys.argv) with parser, runs main(args), exits with
    its code (0 for None)."""
    tune_cpu(parser.prog)
    args = parser.parse_args(argv)
    _guarded(lambda: main(args), parser.prog)


def first_line(e: Exception) -> str:
    """The first line of an exception's message (its type name where the message is empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _one_line(e: Exception) -> str:
    """A flag or config-loading error as one line: absl quotes a config file's whole traceback, whose last
    line is the actual error; keep the flag it concerns and that line."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    if len(lines) == 1:
        from absl import flags

        return lines[0] if isinstance(e, flags.Error) else f"{type(e).__name__}: {lines[0]}"
    return f"{lines[0].split(': Error')[0]}: {lines[-1]}"


@contextlib.contextmanager
def atomic_open(path: str) -> Iterator:
    """A binary file to write that appears at `path` whole or not at all: a temporary file beside it, renamed
    into place when the block ends and removed if the block raises."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes a file so that readers see either nothing or the whole thing (temp file, then rename)."""
    with atomic_open(path) as f:
        f.write(data)
