"""The hyperparameter search of the train stage, one job a module.

* ``space``: params -> the list of trial configs (list axes x sampled points); a tpe suggestion -> a config.
* ``strategies``: which trials train how far: the exhaustive grid, or
  synchronous successive halving (rungs, promotion).
* ``trial``: the worker side of one trial (any process, a pool worker, Ray):
  train from its saved run state up to a budget, report epochs as events.
* ``trial_data``: where a worker gets its data (in process, a mapped file, Ray's object store).
* ``backend`` (the protocol, worker events), ``backend_sequential``, ``backend_pool``,
  ``backend_ray``: where trials run; ``backend_choice`` picks one from ``grid``.
* ``log``: the parent side, the ONLY writer to MLflow and the run cache.
* ``search_progress``: what the user sees: lines, tqdm bars, the grid ETA.
* ``selection``: run records and how the best run is chosen.
* ``runner``: ties them together for the train stage: a search session runs batches of trials.
* ``optuna_space``: lists and ranges as Optuna distributions (drawn points and tpe share them).
* ``ask_tell``: ``grid.strategy: tpe``, a search that learns from finished trials
  (Optuna's TPE, ask/tell in fixed batches, its history replayed from the run cache).
"""
