"""The moving averages a worker advertises in its state (WorkerState), one definition for the live worker
(workers/live_state.py) and the simulator's engines (sim/simulator.py), so that a policy reads the same
quantity in both.

    recent_ttft_ms        the TTFTs it served, alpha TTFT_ALPHA per request (a slow instance shows at once)
    recent_output_tokens  the completion tokens of its finished requests, alpha OUTPUT_ALPHA (outputs vary
                          more than TTFTs; the TTFT estimate wants the typical length of the outputs the
                          requests running and queued there will write, not the last one)

Both are 0 until the first observation (then they start at it).
"""

from __future__ import annotations

TTFT_ALPHA = 0.2
OUTPUT_ALPHA = 0.05


def smoothed(average: float, value: float, alpha: float) -> float:
    """The exponential moving average after `value`; the first value (average 0: nothing yet) is taken as is."""
    return value if average == 0.0 else average + alpha * (value - average)
