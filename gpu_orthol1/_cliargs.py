"""Argument helpers shared by `gpu-orthol1` (cli.py) and `gpu-orthol1 bench` (bench/command.py).

Kept below both, so neither command module imports the other.
"""

from __future__ import annotations

import os


def dims_of(text: str) -> tuple[int, ...]:
    """The sizes of one shape written "4096,32,128" or "4096x32x128" (one separator per shape).

    Args:
        text: the shape as typed on the command line.

    Returns:
        The sizes, as integers (their count and range are the caller's to check).

    Raises:
        ValueError: a size is not an integer (including a shape that mixes the two separators).

    Example:
        >>> dims_of("64x8x16"), dims_of("64,8,16")
        ((64, 8, 16), (64, 8, 16))
    """
    sep = "x" if "x" in text.lower() else ","
    return tuple(int(t) for t in text.lower().split(sep))


def unwritable(opt: str, path: str) -> str | None:
    """Why the output file `path` (given as option `opt`) cannot be written, or None: checked before
    any computing, so a bad path never costs a run.

    Args:
        opt: the option's name as the user typed it, for the message ("--csv").
        path: the file the command will write.

    Returns:
        A one-line reason, or None when the file can be written.

    Example:
        >>> unwritable("--csv", "/no/such/dir/r.csv")
        "--csv '/no/such/dir/r.csv': directory '/no/such/dir' does not exist"
    """
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{opt} {path!r} is a directory; give a file name"
    if not os.path.isdir(parent):
        return f"{opt} {path!r}: directory {parent!r} does not exist"
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"{opt} {path!r} is not writable"
    return None
