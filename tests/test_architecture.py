"""The import graph of abd_fast (issue 13): the library never imports the command line
(abd_fast.cli, abd_fast.train, abd_fast.open_clip_train), no module imports itself through
others (imports inside functions count), and no private name (`_x`) is used outside its
module.

The check reads the sources with ast (nothing is imported); `problems()` takes any
{module name: source} mapping, so the tests below also feed it small bad module sets to show
that each rule can fail.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The command line (python -m abd_fast.train, python -m abd_fast.open_clip_train); everything
# else is library.
CLI = ("abd_fast.cli", "abd_fast.train", "abd_fast.open_clip_train")
EXTENSIONS = ("abd_fast._C", "abd_fast._C_cuda")  # compiled modules (csrc/), no Python source


def package_sources(root: Path = ROOT) -> dict[str, str]:
    """{module name: source} of abd_fast/ and kernels/ (installed as abd_fast.kernels)."""
    out = {}
    for base, package in ((root / "abd_fast", "abd_fast"), (root / "kernels", "abd_fast.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path.read_text()
    return {**out, **{name: "" for name in EXTENSIONS}}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_of(module: str, sources: dict) -> str:
    """The package a module's relative imports start from."""
    if any(m.startswith(module + ".") for m in sources):  # a package's __init__
        return module
    return module.rpartition(".")[0]


def _owner(name: str, sources: dict) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in sources:
            return prefix
    return None


def _in_cli(module: str) -> bool:
    return any(module == c or module.startswith(c + ".") for c in CLI)


class _Imports(ast.NodeVisitor):
    """Edges (imported modules) and private-name uses of one module, at any depth."""

    def __init__(self, module: str, sources: dict):
        self.module, self.sources = module, sources
        self.edges: set[str] = set()
        self.private: list[str] = []
        self.names: dict[str, str] = {}  # local name -> one of our modules

    def _private_module(self, target: str):
        """A module whose own name is private may only be imported inside its package."""
        parent, _, last = target.rpartition(".")
        if _is_private(last) and not self.module.startswith(parent + "."):
            self.private.append(f"{self.module} imports the private module {target}")

    def visit_Import(self, node):
        for alias in node.names:
            target = _owner(alias.name, self.sources)
            if target is None:
                continue
            self.edges.add(target)
            self._private_module(target)
            if alias.asname:
                self.names[alias.asname] = target
            else:  # `import a.b.c` binds `a`
                top = alias.name.split(".")[0]
                if top in self.sources:
                    self.names[top] = top

    def visit_ImportFrom(self, node):
        if node.level:
            base = _package_of(self.module, self.sources)
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = ".".join(p for p in (base, node.module) if p)
        else:
            base = node.module or ""
        if _owner(base, self.sources) is None:
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in self.sources:  # `from package import module`
                self.edges.add(sub)
                self._private_module(sub)
                self.names[alias.asname or alias.name] = sub
                continue
            self.edges.add(_owner(base, self.sources))
            self._private_module(_owner(base, self.sources))
            if _is_private(alias.name):
                self.private.append(f"{self.module} imports {alias.name} from {base}")

    def visit_Attribute(self, node):
        chain, value = [], node
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in self.names:
            current = self.names[value.id]
            for attr in reversed(chain):
                if f"{current}.{attr}" in self.sources:
                    current = f"{current}.{attr}"
                    continue
                if _is_private(attr):
                    self.private.append(f"{self.module} uses {current}.{attr}")
                break
            return  # the chain is handled whole
        self.generic_visit(node)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def problems(sources: dict[str, str]) -> list[str]:
    """Every violation of the three rules in a {module: source} set, as sentences."""
    edges, out = {}, []
    for module, source in sorted(sources.items()):
        visitor = _Imports(module, sources)
        visitor.visit(ast.parse(source, filename=module))
        edges[module] = visitor.edges - {module}
        out += visitor.private
        if not _in_cli(module):
            out += [f"library module {module} imports the command line ({t})"
                    for t in sorted(visitor.edges) if _in_cli(t)]
    out += ["import cycle among " + ", ".join(c) for c in _cycles(edges)]
    return out


# ---- the package -----------------------------------------------------------------------------

def test_the_package_follows_the_layering_rules():
    sources = package_sources()
    assert "abd_fast.cli.common" in sources and "abd_fast.kernels.image_ops" in sources
    assert problems(sources) == []


def test_every_command_is_a_module_of_the_cli_package():
    from abd_fast.train import build_parser
    commands = set(build_parser().stages)
    modules = {m.rpartition(".")[2].replace("_", "-") for m in package_sources()
               if m.startswith("abd_fast.cli.")}
    assert commands and commands <= modules


# ---- the check itself can fail ---------------------------------------------------------------

CLEAN = {
    "abd_fast": "",
    "abd_fast.ops": "from .image import normalize\n",
    "abd_fast.ops._backend": "def resolve(): pass\n",
    "abd_fast.ops.image": "from ._backend import resolve\ndef normalize(): return resolve()\n",
    "abd_fast.report": "from abd_fast.ops import normalize\ndef fmt(v): return str(v)\n",
    "abd_fast.cli": "",
    "abd_fast.cli.common": "from abd_fast.report import fmt\n",
    "abd_fast.cli.pipeline": "from abd_fast.cli import common\ndef run():\n"
                             "    from abd_fast import report\n    return report.fmt(1)\n",
    "abd_fast.train": "from abd_fast.cli import pipeline\n",
}


def _with(**changes) -> dict:
    return {**CLEAN, **{k.replace("__", "."): v for k, v in changes.items()}}


def test_a_clean_module_set_passes():
    assert problems(CLEAN) == []


def test_a_cycle_through_a_function_level_import_fails():
    found = problems(_with(abd_fast__ops___backend="def resolve():\n"
                                                   "    from abd_fast.report import fmt\n"))
    assert found == ["import cycle among abd_fast.ops, abd_fast.ops._backend, "
                     "abd_fast.ops.image, abd_fast.report"]


def test_the_library_importing_the_command_line_fails():
    found = problems(_with(abd_fast__report="def fmt(v):\n"
                                            "    from abd_fast.cli.common import x\n"))
    assert "library module abd_fast.report imports the command line (abd_fast.cli.common)" \
        in found
    found = problems(_with(abd_fast__report="import abd_fast.train as t\n"))
    assert "library module abd_fast.report imports the command line (abd_fast.train)" in found


def test_a_private_name_used_across_modules_fails():
    found = problems(_with(abd_fast__cli__common="from abd_fast.report import _fmt\n"))
    assert found == ["abd_fast.cli.common imports _fmt from abd_fast.report"]
    found = problems(_with(abd_fast__cli__common="from abd_fast import report\n"
                                                 "x = report._fmt(1)\n"))
    assert found == ["abd_fast.cli.common uses abd_fast.report._fmt"]
    found = problems(_with(abd_fast__cli__common="import abd_fast.report\n"
                                                 "x = abd_fast.report._fmt(1)\n"))
    assert found == ["abd_fast.cli.common uses abd_fast.report._fmt"]
    found = problems(_with(abd_fast__cli__common="from abd_fast.ops._backend import resolve\n"))
    assert found == ["abd_fast.cli.common imports the private module abd_fast.ops._backend"]
