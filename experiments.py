"""The experiments of "Rethinking ImageNet Pre-training" (He, Girshick, Dollar 2019), defined once in
minimask/tools/experiments.py: list them, print their commands (a dry run), run them here one after another, collect
their figures and tables.

    python experiments.py list
    python experiments.py print paper                                  (every paper grid, iterations and LR drops)
    python experiments.py print gn --launcher torchrun --data datasets/coco --weights-dir weights
    python experiments.py print syncbn --launcher slurm --root /shared/runs
    python experiments.py run mini --root output/mini                  (the CPU replication, ~15-25 min on 2 cores)
    python experiments.py run tiny --root output/tiny                  (a smoke grid on the synthetic set)
    python experiments.py run modalities --root output/modalities      (visible / thermal / both, KAIST miniature)
    python experiments.py collect output/mini --out output/mini/report

Exit codes: 0 done, 2 bad input, else the exit code of the first job that failed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minimask.tools import collect as co
from minimask.tools import experiments as ex


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the grids and their runs")
    for name, text in (("print", "print the grid's commands (nothing runs)"), ("run", "run the grid here"),
                       ("prepare", "build the data the grid reads (crops, Penn-Fudan layout)")):
        q = sub.add_parser(name, help=text)
        q.add_argument("grid", help=f"one of: {', '.join(ex.grid_names())}")
        q.add_argument("--root", default="output/runs", help="folder of the runs (one sub-folder per run)")
        q.add_argument("--data", default=None, help="detection data for train.py --data (default: datasets/coco "
                       "for the paper grids, synthetic for tiny)")
        q.add_argument("--weights-dir", default="weights", help="folder of the ImageNet weights (R-50-GN.pkl, ...)")
        if name == "print":
            q.add_argument("--launcher", choices=("local", "torchrun", "slurm"), default="local")
            q.add_argument("--gpus", type=int, default=8, help="GPUs per node (torchrun / slurm)")
            q.add_argument("--nodes", type=int, default=1, help="nodes (slurm)")
        if name == "run":
            q.add_argument("--only", nargs="*", default=(), help="run only these jobs (names as in `list`)")
            q.add_argument("--dry-run", action="store_true", help="print the commands instead (as `print`)")
    q = sub.add_parser("collect", help="figures and a table from run folders")
    q.add_argument("runs", nargs="+", help="run folders, or folders holding them")
    q.add_argument("--out", required=True, help="where to write ap.png, table.md, summary.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            for name in ex.grid_names():
                grids = ex.expand(name)
                if name == "paper":
                    print(f"paper: all paper grids ({sum(len(g.runs) for g in grids)} runs)")
                    continue
                g = grids[0]
                flag = "" if g.verified else "  [schedules not verified]"
                print(f"{name}: {g.description}{flag}")
                for job in g.pretrain:
                    print(f"    {job.name}: pretrain.py {job.preset}, {job.iters} iterations at batch {job.batch_size}")
                for run in g.runs:
                    print(f"    {ex.describe(g, run)}")
            return 0
        if args.command == "collect":
            runs = co.find_runs(args.runs)
            summary = co.collect(runs, args.out)
            print(f"collected {len(runs)} run(s) into {args.out}: {', '.join(summary['files'])}")
            print((Path(args.out) / "table.md").read_text())
            return 0
        grids = ex.expand(args.grid)
        data = args.data or ("synthetic" if args.grid in ("tiny", "mini", "ssl") else "datasets/coco")
        if args.command == "print" or getattr(args, "dry_run", False):
            launch = dict(launcher=args.launcher, gpus=args.gpus, nodes=args.nodes) if args.command == "print" else {}
            for g in grids:
                print("\n".join(ex.commands(g, root=args.root, data=data, weights_dir=args.weights_dir, **launch)))
                print()
            return 0
        if args.command == "prepare":
            for g in grids:
                ex.prepare(g, root=args.root, data=data)
            return 0
        for g in grids:
            rc = ex.run_grid(g, root=args.root, data=data, weights_dir=args.weights_dir, only=tuple(args.only))
            if rc:
                return rc
        return 0
    except ValueError as e:
        print(f"experiments.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
