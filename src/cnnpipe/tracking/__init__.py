"""MLflow tracking: one parent run per train execution, one nested child run per trial.

Only ``MlflowClient`` is used (never the fluent ``mlflow.start_run`` stack), so
a tracker is a few plain strings that a parallel worker can rebuild, and
nothing depends on a global "active run". mlflow is imported lazily inside
functions: importing it takes seconds (benchmarks/README.md), and with
``mlflow.enabled: false`` (``NullTracker``) it is never imported at all. One job a module:

* ``store``: where the store is (``$MLFLOW_TRACKING_URI``, params, or
  ``mlflow.db`` at the project root, ``$DVC_ROOT`` in a queued experiment),
  whether it answers, its clients and the lock around its first use;
* ``calls``: the policy every call follows (a locked sqlite is retried, a
  Ctrl-C waits for the call, a failure is one line or, mid-training, a note);
* ``runs``: the run lifecycle (parent, children, epochs, resume, stale runs);
* ``stages``: what the later stages (evaluate, plots) add to those runs.

Model packaging and the registry live in ``cnnpipe.serving``.
"""
