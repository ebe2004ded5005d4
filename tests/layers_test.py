"""The package layering: every import points down the stack, none in a circle.

quant <- nn <- models <- (data) <- interop / harness <- engine <- ablations /
bench <- experiments. Read from the source with `ast` (nothing is imported).
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What each package may import, besides itself.
ALLOWED = {
  "quant": set(),
  "nn": {"quant"},
  "data": set(),
  "models": {"quant", "nn"},
  "interop": {"quant", "nn", "models", "data"},
  "harness": {"quant", "nn", "models", "data"},
  "engine": {"quant", "nn", "models", "data", "interop", "harness"},
  "ablations": {
    "quant",
    "nn",
    "models",
    "data",
    "interop",
    "harness",
    "engine",
  },
  "bench": {"quant", "nn", "models", "data", "interop", "harness", "engine"},
}
TOP = ("qlora_jax", "experiments", "configs")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Every project module `path` imports (`from a import b` counts a.b
  when a.b is a module, else a)."""
  name = _module_name(path)
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith(TOP)}
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      if not module.startswith(TOP):
        continue
      for alias in node.names:
        sub = f"{module}.{alias.name}"
        out.add(sub if _exists(sub) else module)
  return out


def _exists(module: str) -> bool:
  path = ROOT.joinpath(*module.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _sources() -> list[pathlib.Path]:
  files = []
  for top in TOP:
    files += sorted((ROOT / top).rglob("*.py"))
  return files


def _layer(module: str) -> str | None:
  parts = module.split(".")
  if parts[0] == "qlora_jax" and len(parts) > 1:
    return parts[1]
  return None


def test_every_import_points_down_the_layers():
  wrong = []
  for path in _sources():
    name = _module_name(path)
    for target in _imports(path):
      if name.startswith("qlora_jax") and target.startswith(
        ("experiments", "configs")
      ):
        wrong.append(f"{name} -> {target}")
      src, dst = _layer(name), _layer(target)
      if src in ALLOWED and dst is not None and dst != src:
        if dst not in ALLOWED[src]:
          wrong.append(f"{name} -> {target}")
  assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_circles():
  graph = {_module_name(p): _imports(p) for p in _sources()}
  # Importing a package runs its __init__: an edge to it is an edge to the
  # modules its __init__ imports, so only module-to-module cycles count.
  seen, stack, cycles = set(), [], []

  def visit(node):
    if node in stack:
      cycles.append(stack[stack.index(node) :] + [node])
      return
    if node in seen:
      return
    seen.add(node)
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if nxt != node and not node.startswith(nxt + "."):
        visit(nxt)
    stack.pop()

  for node in sorted(graph):
    visit(node)
  assert not cycles, "import circles:\n" + "\n".join(
    " -> ".join(c) for c in cycles
  )


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_says_what_it_is_for(package):
  init = ROOT / "qlora_jax" / package / "__init__.py"
  doc = ast.get_docstring(ast.parse(init.read_text()))
  assert doc and "import" in doc.lower(), f"{init}: say what it imports"
