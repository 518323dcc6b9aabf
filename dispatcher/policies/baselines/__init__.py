"""Baseline routing policies, each reproducing a public router's documented rule and defaults.

Importing this package registers all of them (`make_policy(name)`): round_robin, random,
least_request, power_of_two (simple.py), sglang_cache_aware (sglang.py), aibrix_prefix_cache and
aibrix_prefix_load (aibrix.py), dynamo_kv_cost (dynamo.py), llmd_weighted (llmd.py), lmetric
(lmetric.py), gpu_speed_queue (speed.py). Every constructor takes `seed` (the RNG behind random
choices and tie-breaks); the load and score conventions are in common.py.
"""

from dispatcher.policies.baselines import aibrix, dynamo, llmd, lmetric, sglang, simple, speed

__all__ = ["aibrix", "dynamo", "llmd", "lmetric", "sglang", "simple", "speed"]
