"""The training engine: ``train_run`` trains one ``RunConfig`` on a ``TrainData``.

Small modules, one job each: ``data`` (whole splits as tensors), ``augment``
(batched crop/flip), ``optim`` (optimizer + per-step schedule),
``early_stopping``, ``resume`` (per-epoch state), ``records`` (what a run
reports), ``inference`` (the eval-mode copy, ``evaluate_logits``) and ``loop``
(the loop itself). This ``__init__`` imports nothing: importing one module
never runs the loop.
"""
