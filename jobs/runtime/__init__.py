"""The runtime layer under the jobs: what the commands share and the library must not hold because it
imports Ray or MLflow. Ray start-up and cluster sizing (:mod:`.cluster`), the MLflow store, client, logger
and server (:mod:`.tracking`), checkpoint sources (a file, ``runs:/``, a run id, ``models:/``;
:mod:`.checkpoints`) and registered models (:mod:`.registry`). It imports no entry point. The option
vocabulary, plain argparse, is the library's (:mod:`capenext.options`), so that the pipelines share it
without importing ``jobs``; one-line errors are the library's too (:mod:`capenext.cli`).
"""
