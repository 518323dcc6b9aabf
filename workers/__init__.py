"""The worker service: wraps one SGLang engine, serves routed requests, reports telemetry."""
