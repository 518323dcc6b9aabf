"""Online TTFT model families behind one interface (`base.OnlineTTFTModel`).

The registry (`registry.make_model(family, ...)`, `registry.model_families()`) finds every family in
this package, so adding one is adding a module.
"""
