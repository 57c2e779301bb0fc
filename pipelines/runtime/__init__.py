"""The runtime layer under every entry point, ``pipelines.*`` and ``jobs.*`` alike.

What the commands share and the library must not hold (it imports Ray or MLflow, or it is the command
line itself): Ray start-up and sizing (:mod:`.cluster`), the MLflow store, client, logger and server
(:mod:`.tracking`), checkpoint sources (a file, ``runs:/``, a run id, ``models:/``; :mod:`.checkpoints`)
and the option vocabulary (:mod:`.options`: a flag is defined once and means one thing in every command).
It lives under ``pipelines/`` because that is the lowest place both ``pipelines`` and ``jobs`` import
without climbing (``capenext`` never imports Ray or MLflow; the top level is fixed); it imports nothing
of either. One-line errors are the library's (:mod:`capenext.cli`).
"""
