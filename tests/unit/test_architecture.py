"""The import rules of docs/architecture.md, checked on the real import graph (grimp reads every import,
including those inside functions and under TYPE_CHECKING).

Layers, highest first: the application (`app`: CLI, local stack, demo) > the simulator (`sim`) > the
services (`dispatcher`, `workers`, `learner`: independent of each other) > the core (`lodestar`). A
module may import only from its own layer or below, and the services never import each other.
"""

from __future__ import annotations

import grimp
import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from lodestar.settings import PROJECT_ROOT

SERVICES = ("dispatcher", "workers", "learner")
LAYERS = (
    grimp.Layer("app"),
    grimp.Layer("sim"),
    grimp.Layer(*SERVICES, independent=True),
    grimp.Layer("lodestar"),
)
PACKAGES = ("app", "sim", *SERVICES, "lodestar")


@pytest.fixture
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def illegal(graph: grimp.ImportGraph) -> list[str]:
    """Every import that points up a layer or across services, as 'importing module -> imported module'."""
    found = graph.find_illegal_dependencies_for_layers(layers=LAYERS)
    return sorted(
        " -> ".join([*sorted(route.heads), *route.middle, *sorted(route.tails)])
        for dependency in found for route in dependency.routes
    )


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (strongly connected)."""
    modules = sorted(graph.modules)
    index = {m: i for i, m in enumerate(modules)}
    rows, cols = [], []
    for m in modules:
        for imported in graph.find_modules_directly_imported_by(m):
            if imported in index:
                rows.append(index[m])
                cols.append(index[imported])
    adjacency = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(modules), len(modules)))
    _, labels = connected_components(adjacency, directed=True, connection="strong")
    groups: dict[int, list[str]] = {}
    for m, label in zip(modules, labels, strict=True):
        groups.setdefault(int(label), []).append(m)
    return sorted(g for g in groups.values() if len(g) > 1)


def test_the_project_is_what_the_rules_talk_about(graph):
    # The packages the rules name are the project's packages: a new top-level package must be placed.
    top_level = {p.name for p in PROJECT_ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert top_level == set(PACKAGES)
    assert {"lodestar.settings", "dispatcher.service", "workers.service", "learner.service",
            "sim.simulator", "app.cli"} <= graph.modules


def test_imports_point_down_the_layers_and_services_stay_apart(graph):
    assert illegal(graph) == []


def test_the_rule_catches_an_upward_import(graph):
    # The check is not vacuous: the core importing a service, or one service another, is reported.
    graph.add_import(importer="lodestar.settings", imported="dispatcher.service")
    graph.add_import(importer="workers.service", imported="learner.trainer")
    found = illegal(graph)
    assert any(f.startswith("lodestar.settings -> dispatcher.service") for f in found)
    assert any(f.startswith("workers.service -> learner.trainer") for f in found)


def test_the_cycle_check_finds_a_cycle(graph):
    graph.add_import(importer="lodestar.hashing", imported="lodestar.settings")
    graph.add_import(importer="lodestar.settings", imported="lodestar.hashing")
    assert ["lodestar.hashing", "lodestar.settings"] in cycles(graph)


def test_no_import_cycles(graph):
    # Registries find their plugins at run time (pkgutil), so no plugin module imports its registry's list
    # and no interface imports its plugins: the import graph is a DAG, imports inside functions included.
    assert cycles(graph) == []
