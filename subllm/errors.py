"""The one exception type for mistakes a user can fix (bad config, bad flag, bad file)."""


class SubLLMError(ValueError):
    """A user-facing error: the CLI prints its message as one line, without a stack trace."""
