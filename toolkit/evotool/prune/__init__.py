"""Stage-guided pruning: static layer removal, runtime skipping / early exit, selection baselines.

See docs/prune.md. Layers are numbered 1..L as in the analysis (decoder layer i = ``parts.layers[i - 1]``).
Modules: ``config`` (PruneConfig), ``select`` (selectors), ``calibrate``, ``plan``, ``static``, ``runtime``,
``evaluate``, ``speed``, ``card``, ``run`` (the ``evotool prune`` job).
"""
