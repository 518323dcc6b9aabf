"""Baseline routing policies, each reproducing a public router's documented rule and defaults.

One module per router family (simple.py: load-only rules; sglang.py, aibrix.py, dynamo.py, llmd.py,
lmetric.py: the routers they are named after; speed.py: the project's own GPU-speed heuristic). The
registry (`dispatcher.policies.registry`) finds every policy class here; docs/policies.md lists them with
their sources and parameters. Every constructor takes `seed` (the RNG behind random choices and
tie-breaks); the load and score conventions are in common.py.
"""
