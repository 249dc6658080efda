"""The package version, one place for ``mppool.__version__`` and ``mppool --version``."""

__version__ = "0.1.0"
