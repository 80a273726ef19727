"""The house's structure: data flows one way, the loss contract is read in one place, and a loss
with new needs is added by its own file, its config and a test alone."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from kdlab.losses.base import KDBatch, LossOutput, Needs, RolloutSettings, masked_mean, needs_of
from kdlab.module import DistillModule
from kdlab.steps import AlignedStep, CachedTeacherStep, FusedHeadStep, RolloutStep, TeacherForwardStep, choose_step

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


# The layers, first to last, as data flows: config → objects → batches → step → loss → logs. A module may
# import modules of its own layer or of a later one, never of an earlier one; every module of kdlab belongs to
# exactly one layer (a new module is placed here), so any new arrow back up fails this test. Arrows inside
# a layer cannot run back up either: the cycle test above refuses them.
LAYERS = (
    ("config and entry points", ("kdlab.train", "kdlab.evaluate", "kdlab.generate", "kdlab.report", "kdlab.summary", "kdlab.resolvers")),
    ("build: config → models, data, caches", ("kdlab.build", "kdlab.warm_start", "kdlab.teacher_cache")),
    ("the module: Lightning wiring, evaluation, callbacks", ("kdlab.module", "kdlab.evaluation", "kdlab.exposure", "kdlab.callbacks")),
    ("the step: batch → what the loss reads", ("kdlab.steps", "kdlab.rollout", "kdlab.heads")),
    ("models, checks, metrics", ("kdlab.preflight", "kdlab.models", "kdlab.gguf", "kdlab.metrics")),
    ("data: records → batches", ("kdlab.data",)),
    ("losses: pure math", ("kdlab.losses",)),
    ("leaves", ("kdlab", "kdlab.cache", "kdlab.errors", "kdlab.agreement", "kdlab.distributed", "kdlab.csv_logger", "kdlab.plots", "kdlab.resume")),
)


def layer_of(module: str) -> int | None:
    """The index of ``module``'s layer (``kdlab`` itself, the package root, only by its exact name)."""
    found = {i for i, (_, names) in enumerate(LAYERS) for n in names if module == n or (n != "kdlab" and module.startswith(n + "."))}
    return found.pop() if len(found) == 1 else None


def arrows_back_up(graph: dict[str, set[str]]) -> list[str]:
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    back = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
            for m in sorted(graph) if m not in unplaced for d in sorted(graph[m]) if layer_of(d) is not None and layer_of(d) < layer_of(m)]
    return [f"{m} is in no layer (or in two): place it in LAYERS" for m in unplaced] + back


def test_no_arrow_runs_back_up():
    assert arrows_back_up(module_graph()) == []


def test_the_module_reads_a_loss_through_its_contract_and_the_step_no_data_module():
    graph = module_graph()
    assert {d for d in graph["kdlab.module"] if d.startswith("kdlab.losses")} == {"kdlab.losses.base"}
    assert not {d for m in ("kdlab.steps", "kdlab.rollout", "kdlab.heads") for d in graph[m] if d.startswith("kdlab.data")}


def test_the_layer_check_refuses_an_arrow_up_and_an_unplaced_module():
    assert arrows_back_up({"kdlab.module": {"kdlab.steps"}, "kdlab.steps": {"kdlab.losses.base"}, "kdlab.losses.base": set()}) == []
    assert arrows_back_up({"kdlab.losses.divergences": {"kdlab.rollout"}, "kdlab.rollout": set()}) != []
    assert arrows_back_up({"kdlab.data.files": {"kdlab.build"}, "kdlab.build": set()}) != []
    assert arrows_back_up({"kdlab.newthing": set()}) == ["kdlab.newthing is in no layer (or in two): place it in LAYERS"]


def test_no_config_but_the_suite_s_own_names_its_domains():
    from omegaconf import OmegaConf

    from kdlab import CONF_DIR
    from kdlab.data.suite import DOMAINS

    def words(node):  # keys and string values; comments are explanations, not settings
        if isinstance(node, dict):
            for key, value in node.items():
                yield str(key)
                yield from words(value)
        elif isinstance(node, list):
            for value in node:
                yield from words(value)
        elif isinstance(node, str):
            yield node

    named = {str(p.relative_to(CONF_DIR)) for p in Path(CONF_DIR).rglob("*.yaml")
             if set(words(OmegaConf.to_container(OmegaConf.load(p)))) & set(DOMAINS)}
    assert named == {"data/suite.yaml"}


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
    vocabulary, signals = object(), object()  # across tokenizers: the shared tokens, and the teacher cache or none
    aligned = choose_step(Needs(aligned=True), None, vocabulary)
    assert isinstance(aligned, AlignedStep) and (aligned.vocabulary, aligned.signals) == (vocabulary, None)
    cached = choose_step(Needs(aligned=True, sparse_teacher=True), signals, vocabulary)
    assert isinstance(cached, AlignedStep) and cached.signals is signals
    with pytest.raises(ValueError, match="data=files or data=python_corpus"):
        choose_step(Needs(aligned=True), None, None)
    for declared in (Needs(aligned=True, fused_head=True), Needs(aligned=True, rollouts=RolloutSettings())):
        with pytest.raises(ValueError, match="takes no fused_head and no rollouts"):
            choose_step(declared, None, vocabulary)
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
