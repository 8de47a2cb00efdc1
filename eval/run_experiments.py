"""Run the experiment matrix of eval/experiments.yaml (models x recipes), skipping finished cells.

    python eval/run_experiments.py                      # everything in experiments.yaml
    python eval/run_experiments.py --recipes gptq_w4a16 w8a8 --vqa-questions 64

Each cell runs eval/main_job.py (quantize, evaluate FP vs quantized, reload check). Results go to
eval/results/<model>/: results.json (all cells, keyed), results.md (table) and plots (accuracy with
95% CI, KL, perplexity, size). A cell is skipped when results.json already holds its key: the hash
of the recipe file, the model, the metric settings and the code (src/qvlm_modifiers, recipes/,
eval/main_job.py, eval/run_experiments.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import yaml

EVAL_DIR = Path(__file__).resolve().parent
REPO = EVAL_DIR.parent
sys.path.insert(0, str(EVAL_DIR))

import main_job  # noqa: E402

Q4_NOTE = main_job.Q4_NOTE


def code_version() -> str:
    digest = hashlib.sha256()
    files = sorted((REPO / "src" / "qvlm_modifiers").rglob("*.py")) + sorted((REPO / "recipes").glob("*.yaml"))
    files += [EVAL_DIR / "main_job.py", Path(__file__).resolve()]
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cell_key(recipe_file: str, model: str, settings: dict, version: str) -> str:
    payload = json.dumps({"recipe": Path(recipe_file).read_text(), "model": model, "settings": settings,
                          "code": version}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def markdown_table(cells: dict) -> str:
    lines = ["| recipe | FP acc (95% CI) | quantized acc (95% CI) | KL(FP‖Q) | FP ppl | Q ppl | size MiB | calib s | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for recipe, cell in sorted(cells.items()):
        fp, q = cell["fp"], cell["quantized"]
        acc = lambda r: f"{100 * r['accuracy']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"  # noqa: E731
        lines.append(
            f"| {recipe} | {acc(fp['vqa'])} | {acc(q['vqa'])} | {q['kl']['kl_mean']:.4f} | {fp['ppl']['perplexity']:.2f} | "
            f"{q['ppl']['perplexity']:.2f} | {q['size_bytes'] / 2**20:.1f} | {q['calibration']['wall_s']:.0f} | "
            f"{q['calibration']['peak_rss_bytes'] / 2**30:.2f} |")
    return "\n".join(lines) + "\n\n" + Q4_NOTE.replace("\n", " ") + "\n"


def plot(cells: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = sorted(cells)
    if not recipes:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.2 * len(recipes), 4))
    q_acc = [cells[r]["quantized"]["vqa"] for r in recipes]
    fp_acc = cells[recipes[0]]["fp"]["vqa"]
    err = [[100 * (a["accuracy"] - a["ci_low"]) for a in q_acc], [100 * (a["ci_high"] - a["accuracy"]) for a in q_acc]]
    axes[0].bar(recipes, [100 * a["accuracy"] for a in q_acc], yerr=err, capsize=3)
    axes[0].axhline(100 * fp_acc["accuracy"], color="k", ls="--", label="full precision")
    axes[0].set_ylabel("easy-vqa test accuracy (%)")
    axes[0].legend()
    axes[1].bar(recipes, [cells[r]["quantized"]["kl"]["kl_mean"] for r in recipes])
    axes[1].set_ylabel("KL(FP || Q), answer tokens (nats)")
    axes[2].bar(recipes, [cells[r]["quantized"]["ppl"]["perplexity"] for r in recipes])
    axes[2].axhline(cells[recipes[0]]["fp"]["ppl"]["perplexity"], color="k", ls="--")
    axes[2].set_ylabel("perplexity (Lee corpus)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle("LM weights come from a Q4_1 GGUF: W4 looks easier than on a bf16 model", fontsize=9)
    fig.tight_layout()
    path = out_dir / "metrics.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(EVAL_DIR / "experiments.yaml"))
    parser.add_argument("--recipes", nargs="*", help="only these recipes")
    parser.add_argument("--vqa-questions", type=int)
    parser.add_argument("--force", action="store_true", help="rerun cells that are already done")
    parser.add_argument("--results-root", default=str(EVAL_DIR / "results"), help="results go to ROOT/<model>/")
    args = parser.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    settings = dict(config.get("settings", {}))
    if args.vqa_questions:
        settings["vqa_questions"] = args.vqa_questions
    version = code_version()
    failures = 0
    for model in config["models"]:
        name = model["name"]
        path = str(main_job.DEFAULT_MODEL_DIR) if model["path"] == "default" else model["path"]
        out_dir = Path(args.results_root) / name
        out_dir.mkdir(parents=True, exist_ok=True)
        results_file = out_dir / "results.json"
        results = json.loads(results_file.read_text()) if results_file.exists() else {"cells": {}}
        for recipe in args.recipes or config["recipes"]:
            recipe_file = main_job.recipe_location(recipe)
            key = cell_key(recipe_file, path, settings, version)
            done = results["cells"].get(recipe)
            if done and done.get("key") == key and not args.force:
                print(f"[run_experiments] {name} x {recipe}: done (key {key}), skipped")
                continue
            print(f"[run_experiments] {name} x {recipe}: running", flush=True)
            rc = main_job.main([
                "--model", path, "--recipe", recipe,
                "--vqa-questions", str(settings.get("vqa_questions", 200)),
                "--kl-rows", str(settings.get("kl_rows", 32)),
                "--ppl-tokens", str(settings.get("ppl_tokens", 2048)),
                "--calib-samples", str(settings.get("calib_samples", 64)),
                "--batch-size", str(settings.get("batch_size", 16)),
                "--results-dir", str(out_dir), "--output-dir", str(out_dir / "quantized" / Path(recipe_file).stem),
            ])
            record_path = out_dir / f"main_job_{Path(recipe_file).stem}.json"
            if rc != 0 or not record_path.exists():
                print(f"[run_experiments] {name} x {recipe}: FAILED (exit {rc})", file=sys.stderr)
                failures += 1
                continue
            record = json.loads(record_path.read_text())
            record_path.unlink()  # folded into results.json
            record["key"] = key
            record["code_version"] = version
            for part in ("fp", "quantized"):
                record[part]["vqa"].pop("predictions", None)
            results["cells"][recipe] = record
            results_file.write_text(json.dumps(results, indent=2, default=str))
        (out_dir / "results.md").write_text(f"# {name}\n\n" + markdown_table(results["cells"]))
        plot(results["cells"], out_dir)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
