"""The house's structure: data flows one way, the loss contract is read in one place, and a loss
with new needs is added by its own file, its config and a test alone."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from kdlab.losses.base import KDBatch, LossOutput, Needs, RolloutSettings, masked_mean, needs_of
from kdlab.module import DistillModule
from kdlab.steps import CachedTeacherStep, FusedHeadStep, RolloutStep, TeacherForwardStep, choose_step

PACKAGE = Path(__file__).resolve().parents[1] / "kdlab"


def module_graph() -> dict[str, set[str]]:
    """kdlab module → the kdlab modules it imports (at any level, lazily imported ones included)."""
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdlab"):
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & files.keys()
                deps |= submodules or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names if alias.name.startswith("kdlab")}
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [node, dep] if dep in path else [node, dep]
            if dep not in state and (found := visit(dep, path + [node])):
                return found
        state[node] = 2
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n, [])) is not None), None)


def test_the_import_graph_has_no_cycle():
    assert find_cycle(module_graph()) is None


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None and find_cycle({"a": {"b"}, "b": set()}) is None


# Each layer may not import what comes after it in config → objects → batches → step → loss → logs.
FORBIDDEN = {
    "kdlab.losses": ("kdlab.rollout", "kdlab.steps", "kdlab.module", "kdlab.data", "kdlab.heads", "kdlab.teacher_cache", "kdlab.train", "kdlab.build"),
    "kdlab.rollout": ("kdlab.steps", "kdlab.module", "kdlab.train", "kdlab.losses.divergences", "kdlab.losses.minillm", "kdlab.losses.onpolicy"),
    "kdlab.steps": ("kdlab.module", "kdlab.train", "kdlab.build", "kdlab.data"),
    "kdlab.module": ("kdlab.train", "kdlab.build", "kdlab.rollout", "kdlab.losses.divergences", "kdlab.losses.fused", "kdlab.losses.sparse"),
    "kdlab.data": ("kdlab.module", "kdlab.steps", "kdlab.train", "kdlab.build", "kdlab.rollout", "kdlab.teacher_cache", "kdlab.losses.divergences"),
}


def test_no_arrow_runs_back_up():
    back = [
        f"{module} imports {dep}"
        for module, deps in module_graph().items()
        for layer, forbidden in FORBIDDEN.items()
        if module == layer or module.startswith(layer + ".")
        for dep in deps
        if any(dep == f or dep.startswith(f + ".") for f in forbidden)
    ]
    assert not back


# What a loss declares (its Needs, and the flags of before the declaration), read off a loss
DECLARED = {f.name for f in dataclasses.fields(Needs)} | {"needs", "chunkable", "needs_teacher", "needs_rollouts", "needs_plain_text"}
# The one exception, with its reason: the fused path calls the RowwiseLoss interface (dense on each chunk of
# rows) and says so in one line; which path runs was chosen from the declaration (Needs.fused_head)
TYPED_INTERFACE = {("losses/fused.py", "isinstance(loss, RowwiseLoss)")}


def _is_a_loss(node: ast.AST) -> bool:
    """``loss``, ``<anything>.loss`` or ``self.base`` (a composite's inner loss)."""
    if isinstance(node, ast.Name):
        return node.id == "loss"
    return isinstance(node, ast.Attribute) and (node.attr == "loss" or (node.attr == "base" and ast.unparse(node.value) == "self"))


def loss_inspections(source: str) -> list[str]:
    """Where ``source`` inspects a loss: getattr/hasattr/isinstance/issubclass/vars/type on it (a type named
    in a message aside), or a read of what it declares (``loss.needs``, ``loss.fused_head``, ``loss.chunkable``…).
    Calls of its interface (``loss(batch)``, ``loss.dense``) and strings naming settings are not inspections."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args and _is_a_loss(node.args[0]):
            named = isinstance(parents.get(node), ast.Attribute) and parents[node].attr == "__name__"
            if node.func.id in ("getattr", "hasattr", "isinstance", "issubclass", "vars") or (node.func.id == "type" and not named):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Attribute) and node.attr in DECLARED and _is_a_loss(node.value):
            found.append(ast.unparse(node))
    return found


def test_the_inspection_finder_finds_every_form():
    inspecting = ["isinstance(loss, RowwiseLoss)", "getattr(self.loss, 'needs_teacher', False)", "hasattr(module.loss, 'fused_head')",
                  "type(loss) is TokenKD", "module.loss.fused_head", "self.base.needs", "loss.chunkable", "x = loss.aligned"]
    assert [len(loss_inspections(line)) for line in inspecting] == [1] * len(inspecting)
    innocent = ["loss(batch)", "loss.dense(batch)", "loss.rows_per_chunk(v)", "type(loss).__name__", "needs.fused_head",
                "raise ValueError('set loss.fused_head=false')", "isinstance(base, str)", "out.loss.detach()"]
    assert [loss_inspections(line) for line in innocent] == [[]] * len(innocent)


def test_only_needs_of_inspects_a_loss():
    found = [(str(p.relative_to(PACKAGE)), hit) for p in PACKAGE.rglob("*.py") if p.name != "base.py" for hit in loss_inspections(p.read_text())]
    assert set(found) <= TYPED_INTERFACE, sorted(set(found) - TYPED_INTERFACE)
    assert found, "the fused path's interface line moved: update TYPED_INTERFACE"


def test_each_declaration_gets_its_step():
    rollouts = Needs(rollouts=RolloutSettings())
    assert isinstance(choose_step(Needs(), None), TeacherForwardStep)
    assert isinstance(choose_step(Needs(teacher=False), None), TeacherForwardStep)
    assert isinstance(choose_step(Needs(sparse_teacher=True), object()), CachedTeacherStep)
    assert isinstance(choose_step(Needs(fused_head=True), None), FusedHeadStep)
    assert isinstance(choose_step(rollouts, None), RolloutStep)
    assert needs_of(lambda batch: None) == Needs()  # a plain callable: the teacher's dense logits
    with pytest.raises(TypeError, match="must be a kdlab.losses.base.Needs"):
        needs_of(type("Bad", (), {"needs": {"teacher": False}})())


class StudentEntropy:
    """A loss added by a test alone: the student's mean entropy at the labelled positions, teacher-free
    (it declares so, and the step then runs no teacher forward)."""

    needs = Needs(teacher=False)

    def __call__(self, batch: KDBatch) -> LossOutput:
        assert batch.teacher_logits is None
        log_q = batch.student_logits.float().log_softmax(-1)
        per_token = -(log_q.exp() * log_q).sum(-1)
        loss = masked_mean(per_token, batch.mask, batch.num_tokens)
        return LossOutput(loss=loss, logs={"entropy": loss.detach()})


def test_a_loss_with_its_own_needs_runs_from_its_own_target(tiny_cfg, monkeypatch):
    from kdlab.train import run

    def no_teacher(self, model, batch, mask, original=DistillModule.labelled_logits):
        assert model is not self.teacher, "the teacher ran for a loss that declared it needs none"
        return original(self, model, batch, mask)

    monkeypatch.setattr(DistillModule, "labelled_logits", no_teacher)
    metrics = run(tiny_cfg("loss=ce", f"loss._target_={__name__}.StudentEntropy", "~loss.chunk_size", "~loss.fused_head", "train_only=true"))
    assert torch.isfinite(torch.tensor(metrics["train/entropy"]))
