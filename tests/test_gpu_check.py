"""The GPU check's dry run: the same code as on a GPU, on the CPU with the tiny preset, so that it is known to run
when a GPU is lent (CUDA-against-CPU comparisons then compare the CPU with itself)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import gpu_check  # noqa: E402


def test_dry_run_writes_its_report(tmp_path):
    assert gpu_check.main(["--dry-run", "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    names = [row["check"] for row in report["checks"]]
    assert sum(name.startswith("roi_align") for name in names) == 4 and {"nms", "batched_nms"} <= set(names)
    assert all(row["ok"] for row in report["checks"])
    timed = [row for row in report["timing"] if row["model"] == "minimask tiny"]
    assert [row["amp"] for row in timed] == [False, True]
    assert all(row["train_s_per_iter"] > 0 and row["infer_s_per_iter"] > 0 for row in timed)
    assert "| minimask tiny | no |" in (tmp_path / "gpu_check.md").read_text()
