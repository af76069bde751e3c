"""The ``cnnpipe`` command."""
