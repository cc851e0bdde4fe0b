"""Errors caused by what the user gave: entry points print them as one line and exit with status 2."""


class FastDartsError(ValueError):
    """Bad input: a wrong path, a malformed genotype, an impossible configuration."""


class ConfigError(FastDartsError):
    """A configuration key or value that cannot be used."""


class DataError(FastDartsError):
    """A data directory that is missing, unreadable or not in the expected format."""


class GenotypeError(FastDartsError):
    """A genotype string, file or structure that does not describe a valid cell."""


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN or infinite and the run was told to stop (--on_nan stop)."""
