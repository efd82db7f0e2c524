"""The one error type that CLIs turn into a one-line message and a non-zero exit."""


class GuardtuneError(Exception):
    """A user-facing failure: bad config, bad data, missing model. Its message is the whole story."""
