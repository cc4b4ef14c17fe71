"""The training package's shape: one loop, one module per trainer, one registry, and no import circle among them
(trainer.py and the CLIP/LoRA/ControlNet/TI trainers used to import each other)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import estable.training as training_pkg
from estable.cli_train import _HELP
from estable.errors import EstableError
from estable.training.config import CONFIG_CLASSES
from estable.training.loop import Trainer
from estable.training.registry import TRAINER_KINDS, TRAINERS, make_trainer, trainer_class

TRAINING = Path(training_pkg.__file__).parent
PACKAGE = "estable.training"


def import_graph(folder: Path) -> dict[str, set[str]]:
    """module → the modules of ``folder`` it imports anywhere (top level or inside functions), from the source."""
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in modules:
        edges: set[str] = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = f"{PACKAGE}.{node.module}" if node.level == 1 and node.module else (
                    PACKAGE if node.level == 1 else node.module or "")
                targets = [base] + [f"{base}.{a.name}" for a in node.names]  # "from pkg import module" too
            for target in targets:
                if target.startswith(PACKAGE + "."):
                    head = target[len(PACKAGE) + 1:].split(".")[0]
                    if head in modules and head != name:
                        edges.add(head)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as [a, b, …, a], or None (depth-first search, grey/black marking)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_find_cycle_sees_a_lazy_import_circle(tmp_path):
    (tmp_path / "a.py").write_text("from estable.training.b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import y\n")
    (tmp_path / "c.py").write_text("from estable.training import a\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert find_cycle(graph) in (["a", "b", "a"], ["b", "a", "b"])
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_training_modules_form_no_import_circle():
    graph = import_graph(TRAINING)
    assert {"loop", "builders", "registry", "unet_trainer", "vae_trainer"} <= set(graph)
    assert find_cycle(graph) is None, f"import circle: {' → '.join(find_cycle(graph) or [])}"


def trainer_modules() -> dict[str, str]:
    return {kind: spec.split(":")[0].rsplit(".", 1)[1] for kind, spec in TRAINERS.items()}


def test_the_loop_and_the_builders_import_no_trainer_and_no_trainer_imports_the_registry():
    graph = import_graph(TRAINING)
    trainers = set(trainer_modules().values())
    for shared in ("loop", "builders", "seeding"):
        assert not graph[shared] & (trainers | {"registry"}), (shared, graph[shared])
    for module in trainers:
        assert "registry" not in graph[module], module


def test_a_trainer_module_imports_no_other_trainer_but_its_base_class():
    graph = import_graph(TRAINING)
    modules = trainer_modules()
    for kind, module in modules.items():
        base = trainer_class(kind).__mro__[1]
        allowed = {base.__module__.rsplit(".", 1)[1]}
        assert graph[module] & set(modules.values()) <= allowed, (module, graph[module])


def test_every_kind_resolves_to_its_trainer():
    assert set(TRAINER_KINDS) == set(CONFIG_CLASSES) == set(_HELP)
    for kind in TRAINER_KINDS:
        cls = trainer_class(kind)
        assert issubclass(cls, Trainer) and cls.kind == kind
    with pytest.raises(EstableError, match="unknown trainer 'gan'"):
        make_trainer("gan", CONFIG_CLASSES["unet"](), "unused")


@pytest.mark.parametrize("kind, trainer", [("clip", "CLIP"), ("lora", "LoRA"), ("controlnet", "ControlNet"),
                                           ("ti", "textual-inversion")])
def test_a_trainer_refuses_another_trainers_config(kind, trainer, tmp_path):
    with pytest.raises(EstableError, match=f"^the {trainer} trainer needs a {CONFIG_CLASSES[kind].__name__}, "
                                           "not UNetTrainConfig$"):
        make_trainer(kind, CONFIG_CLASSES["unet"](), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind, trainer", [("lora", "LoRA"), ("controlnet", "ControlNet")])
def test_a_trainer_on_a_frozen_base_needs_one(kind, trainer, tmp_path):
    with pytest.raises(EstableError, match=f"^the {trainer} trainer needs a base model: base=PATH"):
        make_trainer(kind, CONFIG_CLASSES[kind](), tmp_path / "run")
    with pytest.raises(EstableError, match="^base model 'missing.safetensors' does not exist$"):
        make_trainer(kind, CONFIG_CLASSES[kind](base="missing.safetensors"), tmp_path / "run2")


def test_only_the_unet_trainer_shards_with_fsdp():
    # A subclass of UNetTrainer inherits supports_fsdp=True; each one on a frozen base model must turn it off.
    assert [kind for kind in TRAINER_KINDS if trainer_class(kind).supports_fsdp] == ["unet"]
