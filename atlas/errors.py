"""The errors a user can cause and fix; the CLI prints their message as one line."""


class AtlasError(Exception):
    """Base of every user-facing error: the message says what was wrong and what to do."""


class MappingError(AtlasError):
    """The query cannot be mapped onto this atlas as given (the message says what to change)."""
