"""The training engine: ``train_run`` trains one ``RunConfig`` on a ``TrainData``.

Small modules, one job each: ``data`` (whole splits as tensors), ``augment``
(batched crop/flip), ``optim`` (optimizer + per-step schedule), ``finetune``
(which parameters train when), ``early_stopping``, ``ema``, ``resume``
(per-epoch state: assembled, saved, loaded), ``records`` (what a run
reports), ``metrics``, ``precision`` (bf16 autocast on CUDA), ``layer_stats``
(per-layer weight/gradient norms), ``progress`` (mid-epoch lines),
``inference`` (the eval-mode copy, ``evaluate_logits``) and ``loop`` (the
loop itself). This ``__init__`` imports nothing: importing one module never
runs the loop.
"""
