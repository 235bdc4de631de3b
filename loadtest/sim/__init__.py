"""A discrete-event simulator of specd's engine: the REAL scheduler, speculator and policies on
a virtual clock, with only the model runner and the drafter replaced.

Modules: ``dists`` (length and acceptance distributions), ``config`` (the YAML), ``cost`` (the
"true" step-time functions the policy never sees, and the simulated start-up profile),
``drafter`` and ``runner`` (the two stand-ins), ``engine`` (one policy on one arrival trace),
``results`` (summaries, JSON, markdown), ``plot`` (the PNG), and ``compare`` (against a real
sweep). The CLI is ``loadtest.simulate``.
"""
