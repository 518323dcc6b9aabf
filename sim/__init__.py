"""Engine model, SGLang-API emulator, discrete-event simulator and workloads."""
