"""Workloads for the simulator: trace replays and synthetic generators, described by YAML files."""

from sim.workloads.loader import Workload, load_workload, workload_from_spec
from sim.workloads.request import WorkloadRequest
from sim.workloads.spec import Slowdown, parse_workload_spec, read_workload_spec
from sim.workloads.traces import TraceNotFound

__all__ = ["TraceNotFound", "Slowdown", "Workload", "WorkloadRequest", "load_workload", "parse_workload_spec",
           "read_workload_spec", "workload_from_spec"]
