"""The one error type of the data layer."""


class DataError(ValueError):
    """A dataset could not be loaded as asked: the message says what was wrong and what to do."""
