"""Training curves of ``eval/train_vision.py`` from its log: stage-1 alignment loss, stage-2 loss (EMA) and
the validation exact match / caption cross-entropy at each validation step.

    python eval/plot_training_log.py eval/weights/v2/train_vision_stage1.log eval/weights/v2/train_vision.log \
        --out eval/results/smolvlm-tiny-v2/train_vision.png
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ALIGN = re.compile(r"align step (\d+)/\d+ loss ([\d.]+)")
STEP = re.compile(r"\] step (\d+)/\d+ loss [\d.]+ \(ema ([\d.]+)\)")
VAL = re.compile(r"\] step (\d+): val exact-match ([\d.]+).*?(?:val caption CE ([\d.]+))?(?: nats|$)")


def parse(paths: list[Path]) -> dict[str, list[tuple[float, ...]]]:
    """(step, value) series read off the log lines; later files' stage-2 lines replace earlier ones'."""
    out = {"align": [], "loss": [], "val": [], "caption_ce": []}
    for path in paths:
        stage2 = {"loss": [], "val": [], "caption_ce": []}
        for line in path.read_text().splitlines():
            if m := ALIGN.search(line):
                out["align"].append((int(m[1]), float(m[2])))
            elif m := STEP.search(line):
                stage2["loss"].append((int(m[1]), float(m[2])))
            elif m := VAL.search(line):
                stage2["val"].append((int(m[1]), float(m[2])))
                if m[3]:
                    stage2["caption_ce"].append((int(m[1]), float(m[3])))
        if stage2["val"]:  # a finished stage 2 (an aborted run's few steps are dropped)
            out.update(stage2)
    return out


def plot(series: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if series["align"]:
        axes[0].plot(*zip(*series["align"]))
    axes[0].set(title="stage 1: alignment loss", xlabel="step", yscale="log")
    if series["loss"]:
        axes[1].plot(*zip(*series["loss"]))
    axes[1].set(title="stage 2: loss (EMA)", xlabel="step")
    if series["val"]:
        axes[2].plot(*zip(*series["val"]), "o-", label="val exact match")
    if series["caption_ce"]:
        twin = axes[2].twinx()
        twin.plot(*zip(*series["caption_ce"]), "s--", color="tab:orange", label="val caption CE (nats/token)")
        twin.set_ylabel("caption CE")
        twin.legend(loc="upper right")
    axes[2].set(title="stage 2: held-out validation", xlabel="step", ylabel="exact match", ylim=(0, 1.15))
    axes[2].legend(loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.logs if not p.is_file()]
    if missing:
        print(f"error: no such log: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(plot(parse(args.logs), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
