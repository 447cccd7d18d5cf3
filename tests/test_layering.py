"""The map in the README holds: a module imports only from its own layer or the layers below it.
Every `import` in labkit's source is read (module level and inside functions alike); the test
names each import that reaches upward."""

import ast
from pathlib import Path

LABKIT = Path(__file__).resolve().parents[1] / "labkit"

# bottom to top; a module belongs to the first entry that is its name or a package above it
LAYERS: list[tuple[str, ...]] = [
    ("labkit.errors", "labkit.config", "labkit.threads", "labkit.prompts", "labkit.sampling", "labkit.cli_args", "labkit.prompting"),
    ("labkit.kernels", "labkit.metrics"),
    ("labkit.models",),
    ("labkit.engine", "labkit.engine_build", "labkit.engine_choices", "labkit.engine_warmup", "labkit.graphs", "labkit.hidden"),
    ("labkit.specdec",),
    ("labkit.steps", "labkit.tree_verify", "labkit.generate", "labkit.batch"),
    ("labkit.heads_train", "labkit.texts_store", "labkit.eagle_train", "labkit.bench", "labkit.serve", "labkit.doctor", "labkit.notebook", "labkit.kaggle"),
    ("labkit.cli", "labkit.cli_bench", "labkit.cli_generate", "labkit.cli_serve", "labkit.__main__", "labkit"),
]


def layer_of(module: str) -> int:
    for depth in range(module.count(".") + 1, 0, -1):
        prefix = ".".join(module.split(".")[:depth])
        for level, names in enumerate(LAYERS):
            if prefix in names:
                return level
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to the README's map)")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def labkit_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "labkit":
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "labkit"]
    return found


def upward_imports(root: Path = LABKIT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        for line, target in labkit_imports(path):
            if layer_of(target) > layer_of(name):
                bad.append(f"{path.relative_to(root.parent)}:{line} {name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})")
    return bad


def test_no_module_imports_from_a_layer_above_it() -> None:
    assert upward_imports() == []


def test_the_check_finds_an_upward_import(tmp_path) -> None:
    """The rule can fail: a kernel that imports the engine is named."""
    fake = tmp_path / "labkit"
    (fake / "kernels").mkdir(parents=True)
    (fake / "kernels" / "bad.py").write_text("def f():\n    from labkit.engine import Engine\n    return Engine\n")
    (fake / "engine.py").write_text("from labkit.kernels import bad\n")
    assert upward_imports(fake) == ["labkit/kernels/bad.py:2 labkit.kernels.bad (layer 1) imports labkit.engine (layer 3)"]
