"""Calibrated SGLang engine model: step-time model, block radix cache and scheduler (one per GPU)."""

from sim.engine.config import EngineConfig
from sim.engine.perf_model import PerfModel
from sim.engine.radix_cache import BlockRadixCache
from sim.engine.scheduler import (
    Engine,
    EngineLoad,
    EngineRequest,
    Finished,
    FirstToken,
    QueueFull,
    RequestTooLarge,
    StepOutcome,
)

__all__ = [
    "BlockRadixCache",
    "Engine",
    "EngineConfig",
    "EngineLoad",
    "EngineRequest",
    "Finished",
    "FirstToken",
    "PerfModel",
    "QueueFull",
    "RequestTooLarge",
    "StepOutcome",
]
