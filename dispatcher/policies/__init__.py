"""Routing policies: pure, synchronous `choose(request, view) -> Decision` objects.

The live dispatcher and the simulator run these very objects. `make_policy(name)` builds one by name.
"""

from dispatcher.policies.base import Policy, make_policy, policy_names, register

__all__ = ["Policy", "make_policy", "policy_names", "register"]
