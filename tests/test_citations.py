"""The repository explains itself: no comment, docstring or document cites a file that a clone does not have."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"\.\./shared|/work/|reference spec", re.IGNORECASE)


def test_nothing_cites_a_document_outside_the_repository():
    """Code and docs cite the primary source (a paper's section, a detectron2 or torchvision file and function) or
    a document in the repository. Data found at run time through an option or an environment variable is not a
    citation, and none of those lines holds these patterns."""
    files = [*ROOT.glob("minimask/**/*.py"), *ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py"),
             *ROOT.glob("docs/**/*.md"), ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    assert len(files) > 40
    hits = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}" for path in files
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)
