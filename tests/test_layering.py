"""Each layer imports only from layers below it; no model family imports another; nothing imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ptmcli"

# module (or package prefix) -> rank; a module may import only modules of a lower or equal rank
LAYERS = {
    "errors": 0,
    "confdirs": 0,
    "schema": 0,
    "finetune_checks": 0.2,
    "typecheck": 0,
    "fields": 0,
    "architectures": 0,
    "transfers": 0,
    "models": 1,
    "malloc": 0,
    "hardware": 1,
    "optim": 1,
    "distributed": 1,
    "peft": 1.5,
    "objectives": 2,
    "tasks": 2,
    "data": 2,
    "runlog": 2,
    "hf": 2.5,
    "checkpoint": 3,
    "parallel": 1.5,
    "sharded_checkpoint": 1.5,
    "weights": 3.5,
    "rundir": 4,
    "loop": 4,
    "pretrain": 5,
    "finetune": 5,
    "inference": 5.5,
    "generate": 5.5,
    "embed": 5.5,
    "retrieval": 5.6,
    "generation": 2,
    "export": 5.7,
    "hydra_args": 0,
    "files": 0,
    "ranges": 0,
    "preflight": 0.5,
    "compose": 0.7,
    "configtools": 5.8,
    "prepare": 5.8,
    "runs": 4.5,
    "loggers": 2,
    "plots": 2,
    "runfiles": 2,
    "cli": 6,
    "__main__": 7,
    "demo": 7,
}


def _layer(module: str) -> tuple[str, int]:
    head = module.split(".")[0]
    return head, LAYERS[head]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ptmcli."):
            found.add(node.module.removeprefix("ptmcli."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("ptmcli.") for a in node.names if a.name.startswith("ptmcli.")}
    return found


def test_layers_import_downwards_only():
    problems = []
    for path in PACKAGE.rglob("*.py"):
        module = path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        if module == "__init__":
            continue
        head, rank = _layer(module)
        for imported in _imports(path):
            other, other_rank = _layer(imported)
            if other != head and other_rank > rank:
                problems.append(f"{module} imports {imported}")
            shared = (
                "models.layers",
                "models.attention",
                "models.vocab_loss",
                "models.dropout",
                "models.recompute",
                "models.rows",
                "models.exponential",
                "models.memory_attention",
            )  # what every family builds from
            if (
                head == "models"
                and other == "models"
                and imported not in shared
                and module != "models"
                and imported != module
            ):
                problems.append(f"model family {module} imports {imported}")
    assert not problems, problems


def test_schema_and_cli_do_not_import_torch_at_module_level():
    for name in ("schema.py", "cli.py", "errors.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top for a in n.names} | {n.module for n in top if isinstance(n, ast.ImportFrom)}
        assert not any(str(n).startswith("torch") for n in names), name


def test_loop_imports_no_model_and_no_task():
    assert not any(m.startswith(("models", "tasks", "objectives")) for m in _imports(PACKAGE / "loop.py"))
