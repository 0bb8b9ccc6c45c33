"""The fasteners release whose API this package mirrors (``fasteners.version``)."""

_VERSION = "0.20"


def version_string():
    """The mirrored fasteners version, as a string."""
    return _VERSION
