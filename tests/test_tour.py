"""docs/ stays true to the code: every `path.py:name` reference in docs/TOUR.md names a file that exists and a
function, class, method or module-level constant defined in it (read with ast, so nothing is imported or run), and
every relative Markdown link in docs/ resolves."""
import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TOUR = DOCS / "TOUR.md"
# The one reference syntax of TOUR.md: a backquoted repository path ending in .py, optionally ":" and a dotted name.
REFERENCE = re.compile(r"`([A-Za-z0-9_./-]+\.py)(?::([A-Za-z_][A-Za-z0-9_.]*))?`")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def references(text: str) -> list[tuple[str, str | None]]:
    return [(m.group(1), m.group(2)) for m in REFERENCE.finditer(text)]


def _definitions(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names bound at the top of a module or class body: def, async def, class, and (annotated) assignments."""
    names = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


@functools.lru_cache(maxsize=None)
def _module_scope(file: Path) -> dict[str, ast.AST]:
    return _definitions(ast.parse(file.read_text(encoding="utf-8"), filename=str(file)).body)


def resolve(path: str, name: str | None, root: Path = ROOT) -> str | None:
    """None if `path` exists under `root` and defines the dotted `name` (class members through the class body);
    otherwise what is wrong."""
    file = root / path
    if not file.is_file():
        return f"{path}: no such file"
    if name is None:
        return None
    scope = _module_scope(file)
    parts = name.split(".")
    for i, part in enumerate(parts):
        node = scope.get(part)
        if node is None:
            where = path if i == 0 else f"{path}:{'.'.join(parts[:i])}"
            return f"{path}:{name}: {part!r} is not defined in {where}"
        if i < len(parts) - 1:
            if not isinstance(node, ast.ClassDef):
                return f"{path}:{name}: {'.'.join(parts[:i + 1])} is not a class"
            scope = _definitions(node.body)
    return None


def test_resolver_accepts_real_names_and_rejects_made_up_ones(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        "X = 1\nY: int = 2\ndef f():\n    def inner(): pass\nclass C:\n    Z = 3\n    def g(self): pass\n"
        "    class D:\n        def h(self): pass\n")
    for name in (None, "X", "Y", "f", "C", "C.Z", "C.g", "C.D.h"):
        assert resolve("pkg/m.py", name, tmp_path) is None, name
    for name in ("nope", "f.inner", "C.nope", "C.g.x", "C.D.nope"):
        assert resolve("pkg/m.py", name, tmp_path) is not None, name
    assert "no such file" in resolve("pkg/missing.py", "f", tmp_path)
    assert references("see `a/b.py:C.g` and `c.py`, not `d.pyc` or `e.py:`") == [("a/b.py", "C.g"), ("c.py", None)]


def test_every_tour_reference_exists():
    text = TOUR.read_text(encoding="utf-8")
    # One syntax only: a backquoted span that names a .py file with ":" must be a whole reference, or it is not checked.
    malformed = [span for span in re.findall(r"`([^`\n]*\.py:[^`\n]*)`", text) if not REFERENCE.fullmatch(f"`{span}`")]
    assert not malformed, f"references not of the form `path.py:dotted.name`: {malformed}"
    refs = references(text)
    assert len(refs) >= 40, "the tour should point at the code it describes"
    broken = sorted({problem for path, name in refs if (problem := resolve(path, name)) is not None})
    assert not broken, "broken references in docs/TOUR.md:\n" + "\n".join(broken)


def test_tour_covers_every_paper_concept():
    text = TOUR.read_text(encoding="utf-8")
    concepts = ["GN", "SyncBN", "FrozenBN", "random init", "ImageNet init", "warm-up", "RoIAlign",
                "FPN level", "mask targets", "keypoint targets", "Cascade", "precise BN", "1x", "9x"]
    missing = [c for c in concepts if c.lower() not in text.lower()]
    assert not missing, f"docs/TOUR.md does not mention {missing}"


@pytest.mark.parametrize("doc", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_relative_links_in_docs_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # http:, mailto:, in-page anchors
            continue
        path = target.split("#", 1)[0]
        if not (doc.parent / path).exists():
            broken.append(target)
    assert not broken, f"{doc.name}: links to missing files: {broken}"
