"""Exceptions a user can act on. The CLI prints their message on one line and exits with status 2."""


class EstableError(Exception):
    """Base class for errors caused by the user's input (files, options), not by a bug."""


class CheckpointError(EstableError):
    """A checkpoint file or folder cannot be read, or does not match the model it should fill."""


class UnsupportedModelError(EstableError):
    """A model uses an option Estable does not implement; the message names the option."""
