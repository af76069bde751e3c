"""cnnpipe: a declarative DVC + MLflow pipeline for CNN image classifiers."""

__version__ = "0.1.0"
