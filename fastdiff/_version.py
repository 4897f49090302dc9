"""fastdiff's version, in a module of its own: modules of the package read it from here (``fastdiff/__init__.py``
imports the whole library, so importing the version from there would make an import cycle)."""

__version__ = "0.1.0"
