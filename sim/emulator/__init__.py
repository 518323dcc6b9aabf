"""The SGLang-API emulator: the calibrated engine model served over SGLang 0.5.x's HTTP API.

`sim.emulator.server` has `create_app` and `serve`; `sim.emulator.emulator` the `Emulator` they serve.
"""
