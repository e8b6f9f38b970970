"""The package's layout rules, checked on the source (fast, no model): imports run one way, the backbone
seam is the only code that knows the denoiser, the toy world is a plug-in, no private name crosses a
module line."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1] / "patchforge"


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """Every patchforge module `name` imports, at any depth of the file (function-level imports count),
    plus modules named in "patchforge.x.y:attr" strings (how registries and the CLI name what they load)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):  # "patchforge.x:run_command"
            targets = [node.value.partition(":")[0]] if re.fullmatch(r"patchforge(\.\w+)+:\w+", node.value) else []
        for t in targets:
            while t and t not in known:  # "patchforge.x.y:func" or "pkg.mod.attr" -> the module
                t = t.rpartition(".")[0]
            if t and t != name and t != "patchforge":
                out.add(t)
    return out


def test_no_import_cycle():
    mods = modules()
    graph = {m: imports(m, f, mods) for m, f in mods.items()}
    # a package's __init__ is imported by its children: an edge child -> package is implied, so count it
    for m in mods:
        parent = m.rpartition(".")[0]
        if parent in mods and parent != "patchforge":
            graph[m].add(parent)
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_cycle_check_can_fail(tmp_path):
    """The walker sees a cycle hidden in function-level imports."""
    pkg = tmp_path / "patchforge"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    known = {"patchforge.a": pkg / "a.py", "patchforge.b": pkg / "b.py"}
    assert imports("patchforge.a", pkg / "a.py", known) == {"patchforge.b"}
    assert imports("patchforge.b", pkg / "b.py", known) == {"patchforge.a"}


def test_no_private_name_crosses_a_module_line():
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("patchforge")):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{name} imports private {private} from {node.module}"


def test_only_the_backbones_know_the_denoiser():
    """Outside patchforge/backbones, no library file reads `.unet` or names `attn2`."""
    for name, path in modules().items():
        if name.startswith("patchforge.backbones"):
            continue
        text = path.read_text()
        assert not re.search(r"\.unet\b", text), f"{path.name} reads .unet"
        assert "attn2" not in text, f"{path.name} names attn2"


def test_the_toy_world_is_a_plug_in():
    """Only the world registry names the toy world's package; nothing else imports it."""
    mods = modules()
    for name, path in mods.items():
        if name.startswith("patchforge.toyworld") or name == "patchforge.core.worlds":
            continue
        bad = [m for m in imports(name, path, mods) if m.startswith("patchforge.toyworld")]
        assert not bad, f"{name} imports {bad}"
        assert "toyworld" not in path.read_text(), f"{name} names the toyworld package"


def test_is_this_the_toy_model_is_decided_in_one_place():
    """A model is compared with the toy's names only in pipeline_loading.is_toy."""
    for name, path in modules().items():
        if name == "patchforge.core.pipeline_loading":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                assert not {"toy", "patchforge/toy-sd"} & set(consts), f"{name} compares with a toy name"


# The wings, bottom to top: a module imports only from its own wing or lower ones. core is the bottom
# layer; the backbone seam is above it (its types, Cond included, are its own); pipeline/ works through
# the seam (sampling, the memory plan, soft tokens). The toy world is a plug-in above the library (it may
# use any of it; only core.worlds names it, by string).
WINGS = [("errors", "compat"), ("core",), ("backbones",), ("pipeline",), ("io",), ("methods",), ("train",),
         ("eval",), ("demo",), ("toyworld",), ("cli",)]


def wing(module: str) -> int:
    ranks = [i for i, names in enumerate(WINGS) for w in names
             if module == f"patchforge.{w}" or module.startswith(f"patchforge.{w}.")]
    assert ranks, f"{module} belongs to no wing: add its folder to WINGS"
    return ranks[0]


def test_folders_are_layered():
    """core < backbones < pipeline < io < methods < train < eval: imports (function-level ones included) only run
    downward or within a wing, so a folder can be read knowing only the folders below it."""
    mods = modules()
    for name, path in mods.items():
        if name == "patchforge":
            continue
        for target in imports(name, path, mods):
            if name == "patchforge.core.worlds" and target.startswith("patchforge.toyworld"):
                continue  # the registry names the plug-in by string
            if name == "patchforge.cli":  # the CLI names every verb's run function by string
                continue
            assert wing(target) <= wing(name), f"{name} imports {target} from a higher wing"


def test_the_layer_check_can_fail():
    assert wing("patchforge.eval.attacks") > wing("patchforge.train.loop") > wing("patchforge.core.concepts")
    assert wing("patchforge.pipeline.plan") > wing("patchforge.backbones.sd_unet") > wing("patchforge.core.worlds")
