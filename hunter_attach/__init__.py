"""hunter_attach: an strace for Python processes."""

__version__ = "0.1.0"
