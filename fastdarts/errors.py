"""Errors caused by what the user gave: entry points print them as one line and exit with status 2."""

from __future__ import annotations

import os


class FastDartsError(ValueError):
    """Bad input: a wrong path, a malformed genotype, an impossible configuration."""


class ConfigError(FastDartsError):
    """A configuration key or value that cannot be used."""


class DataError(FastDartsError):
    """A data directory that is missing, unreadable or not in the expected format."""


class GenotypeError(FastDartsError):
    """A genotype string, file or structure that does not describe a valid cell."""


class RunFailed(RuntimeError):
    """A run that cannot go on, through no fault of its input: entry points print one line and exit with status 1."""


class TrainingDiverged(RunFailed):
    """A loss or gradient became NaN or infinite and the run was told to stop (--on_nan stop)."""


class CheckpointWriteError(RunFailed):
    """A checkpoint could not be written (disk full, permissions); the previous one is left intact."""


# The characters str.splitlines() breaks a line at, each mapped to its backslash escape.
_LINE_BREAKS = {ord(c): c.encode("unicode_escape").decode() for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def one_line(message: str) -> str:
    """`message` with its line breaks escaped: a path or a config key quoted in it may hold one."""
    return message.translate(_LINE_BREAKS)


def shorten(text: str, limit: int = 100) -> str:
    """`text` cut to about `limit` characters for a one-line message (a genotype or path can be thousands long)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[: limit - 40]}... ({len(text)} characters)"


def summary(error: BaseException, limit: int = 300) -> str:
    """`Type: message` of `error` on one line, cut to about `limit` characters (a failed load_state_dict lists
    every mismatching tensor on a line of its own)."""
    return shorten(f"{type(error).__name__}: {' '.join(str(error).split())}", limit)


def path_stat(
    path: str | os.PathLike, what: str, error: type[FastDartsError] = FastDartsError
) -> os.stat_result | None:
    """`os.stat(path)`, or None when nothing is there. A path the system refuses to look up (a name too long, a
    file where a directory is expected, no permission to search a directory) raises `error`, one line naming `what`,
    the path and the reason, where pathlib's `exists()` and `is_dir()` let a bare OSError through."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except ValueError:  # an embedded NUL byte: no file has such a name
        return None
    except OSError as e:
        raise error(f"{what} {shorten(os.fspath(path))}: {e.strerror}") from None
