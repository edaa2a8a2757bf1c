"""The layers run one way (docs/architecture.md): a module imports only from its own package
or from layers below it. Read from the source with ast, function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Package -> layer. Packages on one layer are independent of each other; a new package must
# be placed here before it can import anything.
LAYERS = {
    "scaletrain": 0,  # the package root: its version only
    "scaletrain.core": 0,  # config base, logging, distributed environment, files, run dir
    "scaletrain.models": 1,
    "scaletrain.diffusion": 1,
    "scaletrain.data": 1,
    "scaletrain.export": 2,  # every weights format; never the trainer
    "scaletrain.sample": 3,  # the one prompt -> image path (validation uses it)
    "scaletrain.eval": 4,  # validation loss, FID, CLIP score (training and `scaletrain eval`)
    "scaletrain.train": 5,
    "scaletrain.launch": 6,  # local launcher and SLURM submission run the trainer
    "scaletrain.config": 7,  # the root config composes every section
    "scaletrain.config_docs": 8,
    "scaletrain.cli": 9,  # the commands; nothing imports them
}
# What the models must never import: the engine wraps them from outside.
MODELS_NEVER = ("deepspeed", "wandb", "torch.distributed")


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def modules(folder: str):
    for path in sorted((REPO / folder).rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        yield path, name.removesuffix(".__init__")


def test_every_import_points_down_or_stays_in_its_package():
    wrong = []
    for path, name in modules("scaletrain"):
        own = package_of(name)
        assert own in LAYERS, f"{name}: package {own} has no layer in this test's LAYERS"
        for line, target in imports(path):
            if not target.startswith("scaletrain"):
                continue
            other = package_of(target)
            if other != own and (other not in LAYERS or LAYERS[other] >= LAYERS[own]):
                wrong.append(f"{path.relative_to(REPO)}:{line}: {own} imports {target}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_models_import_no_engine_code():
    wrong = [f"{path.relative_to(REPO)}:{line}: {target}"
             for path, _ in modules("scaletrain/models") for line, target in imports(path)
             if target.startswith(MODELS_NEVER)]
    assert not wrong, "\n".join(wrong)


def test_nothing_outside_the_tests_imports_them():
    wrong = [f"{path.relative_to(REPO)}:{line}: {target}"
             for folder in ("scaletrain", "benchmarks") for path, _ in modules(folder)
             for line, target in imports(path) if target.split(".")[0] == "tests"]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule above is not vacuous: a model importing the trainer is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from scaletrain.train.loop import run_training\n")
    ((line, target),) = imports(bad)
    assert LAYERS[package_of(target)] > LAYERS["scaletrain.models"] and line == 2
