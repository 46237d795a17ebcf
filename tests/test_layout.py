"""The package's layout: no import circles (lazy imports inside functions count too), the
library's trainers never reach into the worlds (the demos' and tests' tasks and scorers),
and the names users and the docs import keep working after the worlds moved."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlhf_ext"
# names kept for earlier imports: each replaces itself with the module it names
ALIASES = {"rlhf_ext.tiny": "rlhf_ext.worlds.tiny", "rlhf_ext.real": "rlhf_ext.worlds.smollm2"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body (every ``import`` and
    ``from ... import`` statement, at the top or inside a function), aliases excluded."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        if name in ALIASES:
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the submodule; `from mod import name` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            else:
                continue
            edges |= {ALIASES.get(t, t) for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = import_graph()
    assert {"rlhf_ext.ppo.trainer", "rlhf_ext.sampling", "rlhf_ext.worlds.smollm2.task"} <= set(graph)
    assert "rlhf_ext.ppo.rollout" in graph["rlhf_ext.evaluation"]  # lazy imports are seen
    assert cycles(graph) == []


def test_the_library_does_not_import_the_worlds():
    """Only the recipes' launcher (``--tiny_world_dir``, the tiny oracle as ``--reward
    oracle``) and the recipes reach the worlds; no trainer, loss or model module does."""
    graph = import_graph()
    allowed = ("rlhf_ext.worlds", "rlhf_ext.recipes", "rlhf_ext.launch")
    offenders = {m: sorted(e for e in edges if e.startswith("rlhf_ext.worlds"))
                 for m, edges in graph.items() if not m.startswith(allowed)}
    assert {m: e for m, e in offenders.items() if e} == {}


def test_earlier_imports_keep_working():
    import rlhf_ext.tiny.world
    from rlhf_ext.tiny.task import oracle_score as task_oracle

    import rlhf_ext.worlds.smollm2 as smollm2
    import rlhf_ext.worlds.tiny as tiny
    from rlhf_ext.real import smollm2_path, vader_reward
    from rlhf_ext.tiny import ensure_world, oracle_score

    # the same objects, not copies: isinstance and module state agree
    assert ensure_world is tiny.ensure_world and oracle_score is task_oracle is tiny.oracle_score
    assert rlhf_ext.tiny.world is tiny.world
    assert sys.modules["rlhf_ext.tiny"] is tiny and sys.modules["rlhf_ext.real"] is smollm2
    assert vader_reward is smollm2.vader_reward and smollm2_path is smollm2.smollm2_path
    assert vader_reward(["p"], ["A wonderful, moving film."])[0] > 0.5


def test_the_recipes_resolve_the_old_reward_spec():
    """``--reward module:function`` imports the module by name, as the PPO recipe does."""
    import importlib

    from rlhf_ext.worlds.smollm2 import vader_reward

    for spec in ("rlhf_ext.real:vader_reward", "rlhf_ext.worlds.smollm2:vader_reward"):
        module, name = spec.split(":")
        assert getattr(importlib.import_module(module), name) is vader_reward


@pytest.mark.parametrize("module", ["rlhf_ext.real", "rlhf_ext.worlds.smollm2"])
def test_module_entry_point_prints_the_model_directory(module, tmp_path, monkeypatch, capsys):
    """``python -m rlhf_ext.real`` (the old name) and the new one print SmolLM2's directory
    (here an already complete one in a fresh cache, so nothing is built). Run as ``-m``
    runs them (runpy), in this process: a new one would spend 7 s importing the package."""
    import runpy

    target = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"")
    (target / "tokenizer.json").write_text("{}")
    monkeypatch.setenv("RLHF_EXT_CACHE", str(tmp_path / "cache"))
    runpy.run_module(module, run_name="__main__", alter_sys=False)
    assert capsys.readouterr().out.strip() == str(target)
