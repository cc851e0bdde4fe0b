"""Errors caused by what the user gave: entry points print them as one line and exit with status 2."""


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
