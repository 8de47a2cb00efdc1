"""Paired comparison of archived matrix runs (results/<model>/archive/*.json: runs of code that no
cell runs any more) with a current cell of results.json, by calibration seed: the same statistics
as the matrix's `comparisons` (qvlm_eval.paired.compare_runs: paired bootstrap of the per-row KL,
per-question hits, McNemar per seed). Differences are A - B (A = the current cell).

    python eval/compare_archived.py qvlm_w4_rtn archive/qvlm_w4_s32.json qvlm_w4_s32 [--model smolvlm-tiny-v2]

The file may be ``results.json`` itself: two current cells that no `comparisons` entry of experiments.yaml
pairs (ablations, one-seed cells against a 3-seed one: only the common seeds are paired):

    python eval/compare_archived.py qvlm_w4_mse results.json qvlm_w4_rtn
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EVAL_DIR = Path(__file__).resolve().parent


def main(argv=None) -> int:
    sys.path.insert(0, str(EVAL_DIR.parent))
    from qvlm_eval.paired import compare_runs
    from qvlm_eval.run_experiments import group_by_cell

    def runs_by_seed(cells: dict, cell: str) -> dict[int, dict]:
        return {seed: record for seed, (_, record) in group_by_cell(cells).get(cell, {}).items()}

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("current", help="cell of results.json (A)")
    parser.add_argument("archive", help="archive file, relative to the model's results folder (or results.json)")
    parser.add_argument("archived", help="cell id in the archive (B)")
    parser.add_argument("--model", default="smolvlm-tiny-v2")
    parser.add_argument("--results-root", default=str(EVAL_DIR / "results"))
    args = parser.parse_args(argv)
    folder = Path(args.results_root) / args.model
    current = runs_by_seed(json.loads((folder / "results.json").read_text())["cells"], args.current)
    archived = runs_by_seed(json.loads((folder / args.archive).read_text())["cells"], args.archived)
    if not current or not archived:
        print(f"error: no runs of {args.current if not current else args.archived}", file=sys.stderr)
        return 2
    result = compare_runs(current, archived, names=(args.current, args.archived))
    for name, runs in ((args.current, current), (args.archived, archived)):
        accs = [100 * runs[s]["quantized"]["vqa"]["accuracy"] for s in sorted(runs)]
        kls = [runs[s]["quantized"]["kl"]["kl_mean"] for s in sorted(runs)]
        cal = [runs[s]["quantized"]["calibration"]["wall_s"] for s in sorted(runs)]
        print(f"{name:14s} seeds {sorted(runs)}  accuracy {', '.join(f'{a:.1f}' for a in accs)}  "
              f"KL {', '.join(f'{k:.3f}' for k in kls)}  calibration wall s {', '.join(f'{c:.0f}' for c in cal)}")
    print(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
