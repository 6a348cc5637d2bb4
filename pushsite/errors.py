"""Errors that cross layers: services raise them, entry points map them to codes."""


class BackendUnavailable(Exception):
    """A backend (database, Redis, the main site) is down or too slow: answer 503."""
