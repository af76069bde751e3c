"""The params schema: pydantic owns every key of ``params.yaml``.

Top-level *training keys* (``lr``, ``batch_size``, ...) are search axes: one
value, a list of values (every one is tried: the grid is the Cartesian
product of the lists), or a range that ``grid.samples`` points are drawn from
(``{log_uniform: [lo, hi]}``, ``{uniform: [lo, hi]}``, ``{int_uniform: [lo,
hi]}``, ``{choice: [...]}``; drawn by :mod:`cnnpipe.search.space`). Everything
else lives in sections (``data``, ``eval``, ``mlflow``, ``grid``,
``pretrained``) or names architectures (``models``). Every default equals the
shipped ``params.yaml`` (a test walks every field), so deleting a key never
changes the recipe. Only pydantic, yaml and the dataset/model tables are
imported here (no numpy, torch or mlflow), so ``cnnpipe validate`` answers in
well under a second. One job a module:

* ``values``: one run's training values (``TrainingValues``: each training
  key declared once, with its type and default);
* ``axes``: a key as a value, a list or a range (``Axis``);
* ``sections``: ``data``, ``eval``, ``mlflow``, ``grid``, ``pretrained``;
* ``schema``: ``Params``, the whole file, its axes derived from ``values``;
* ``run_config``: ``RunConfig``, one search point;
* ``messages``: every problem as one ``ParamsError`` line;
* ``load``: reading the file.

Import from the module that defines a name: this ``__init__`` imports nothing,
so loading one module never runs the others.
"""
