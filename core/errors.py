"""The errors of a training run. They live apart from hyloom.train (which imports torch, and re-exports them)
so that the CLI can catch them without importing torch."""


class TrainingError(Exception):
    """A run that cannot go on (e.g. a non-finite loss); the last good checkpoint is kept. The CLI exits with 1."""


class SetupError(TrainingError):
    """A run that cannot start as asked (run directory already used, nothing left to resume, no such device);
    nothing has been written. The CLI exits with 2."""
