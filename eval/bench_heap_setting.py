"""CPU inference time with and without the glibc heap setting of ``qvlm_modifiers.heap``.

    python eval/bench_heap_setting.py --questions 60 --repeats 2

Each run is a fresh process (the setting is process-wide and cannot be undone) that loads the
default model in fp32 on one thread, warms up on 10 questions, then times greedy easy-vqa
generation (``metrics.evaluate_vqa``, batch 20) on ``--questions`` test questions. The runs
alternate the two settings (``QVLM_MALLOC_TUNING=0`` vs ``=1``, applied at import, before loading)
and the script prints the median process CPU time of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

EVAL_DIR = Path(__file__).resolve().parent


def child(questions: int) -> dict:
    import time

    import torch

    torch.set_num_threads(1)
    from qvlm_eval import main_job

    from qvlm_modifiers import heap
    from qvlm_eval import metrics
    from qvlm_eval.default_model import ensure_default_model

    model, processor = metrics.load_model_and_processor(ensure_default_model(main_job.DEFAULT_MODEL_DIR),
                                                        dtype=torch.float32)
    data = metrics.load_vqa_dataset("easy-vqa", split="test", num_samples=questions, seed=0)
    metrics.evaluate_vqa(model, processor, data.select(range(min(10, questions))), batch_size=10)
    wall, cpu = time.perf_counter(), time.process_time()
    accuracy = metrics.evaluate_vqa(model, processor, data, batch_size=20)["accuracy"]
    return {"applied": heap._applied is not None, "cpu_s": time.process_time() - cpu,  # noqa: SLF001
            "wall_s": time.perf_counter() - wall, "accuracy": accuracy}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.questions)))
        return 0
    runs: dict[str, list[dict]] = {"0": [], "1": []}
    for _ in range(args.repeats):
        for setting in ("0", "1"):
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            env["QVLM_MALLOC_TUNING"] = setting
            out = subprocess.run([sys.executable, __file__, "--child", "--questions", str(args.questions)],
                                 capture_output=True, text=True, env=env, check=True).stdout
            runs[setting].append(json.loads(out.strip().splitlines()[-1]))
    if not all(r["applied"] for r in runs["1"]) or any(r["applied"] for r in runs["0"]):
        raise SystemExit("the setting was not applied as requested (not glibc, or MALLOC_* set?)")
    cpu = {k: statistics.median(r["cpu_s"] for r in v) for k, v in runs.items()}
    for k, label in (("0", "glibc default"), ("1", "fixed threshold")):
        print(f"{label:<16} CPU {cpu[k]:6.2f} s (runs {[round(r['cpu_s'], 2) for r in runs[k]]}), "
              f"accuracy {runs[k][0]['accuracy']:.3f}")
    print(f"fixed / default CPU time: {cpu['1'] / cpu['0']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
