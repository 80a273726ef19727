"""The house's structure: data flows one way, the loss contract is read in one place, and a loss
with new needs is added by its own file, its config and a test alone."""

import ast
import re
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


def test_only_needs_of_inspects_a_loss():
    # getattr/hasattr on anything called loss (or a loss's base) outside kdlab/losses/base.py
    pattern = re.compile(r"\b(getattr|hasattr)\((self\.)?(loss|base)\b")
    found = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
             if pattern.search(line) and p.name != "base.py"]
    assert not found


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
