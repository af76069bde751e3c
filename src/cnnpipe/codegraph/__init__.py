"""The package's own import graph: the code a result or a stage depends on, and the layer order it must keep."""
