"""fintwin: customer digital twins."""

__version__ = "0.1.0"
