"""Routing policies: pure, synchronous `choose(request, view) -> Decision` objects.

The live dispatcher and the simulator run these very objects. The interface is `base.Policy`; the
registry (`registry.make_policy(name, params, seed=...)`, `registry.policy_names()`) finds every
policy class in this package, so adding one is adding a module.
"""
