"""The one exception type users see: the CLI prints it as a single line and exits non-zero."""


class LLMPruneError(Exception):
    """Bad input or an unrecoverable condition, described in one line."""
