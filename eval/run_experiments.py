"""Run the experiment matrix of eval/experiments.yaml (models x cells), skipping finished cells.

    python eval/run_experiments.py                          # every cell of experiments.yaml
    python eval/run_experiments.py --only rtn_w4a16 mbq_w3  # just these cells
    python eval/run_experiments.py --list                   # the cells and whether each is done

A cell is one recipe (a shipped recipe name or a YAML under eval/recipes/) with a method and a
scheme label, optionally with another calibration seed (noise reruns). Each cell runs
eval/main_job.py: quantize with the recipe through qvlm_modifiers.oneshot -> save -> reload ->
metrics (the full-precision metrics are computed once per model and cached). Results go to
eval/results/<model>/: results.json (every cell, keyed), results.md (table by scheme) and
metrics.png (accuracy and KL vs scheme, one line per method; calibration time per cell).

A cell is skipped when results.json holds it under the same key: a hash of the recipe text (after
any group-size override), the model's files, the metric settings, the arguments this script passes
to the job, and the code the job runs (src/qvlm_modifiers without the method subpackages its recipe
does not name, and the lab modules the job runs: main_job, metrics, default_model). This file itself is not part of the code version: the
arguments it hands the job are in the key, and the rest of it (tables, plots, listing) computes no
metric. Not keyed: installed package versions and the machine (recorded per cell under "machine"),
and the process state the job inherits (cells run in this process one after another, so a cell's
peak RSS includes what earlier cells left on the heap; accuracy, KL and perplexity do not depend on
it). A results.json with cells from other code or another model is refused with an error naming
them, unless --rerun-stale (recompute those cells) is given; --list shows every cell's state.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

EVAL_DIR = Path(__file__).resolve().parent
REPO = EVAL_DIR.parent
from qvlm_eval import main_job  # noqa: E402

Q4_NOTE = main_job.Q4_NOTE
# order of the table rows and of the calibration-time bars: weight-only schemes, then weight-activation
# ones (the accuracy/KL panels place schemes by their bits instead: plot_lines)
SCHEME_ORDER = ["W3A16", "W4A16", "W4A4", "W6A6", "W4A8", "W8A8"]


class StaleResultsError(RuntimeError):
    """results.json holds cells computed by other code."""


# Method subpackages: a cell's code version covers one only when its recipe names that Modifier, so
# work on Q-VLM does not invalidate the GPTQ cells (which never run Q-VLM code).
METHOD_PACKAGES = {"MBQModifier": "mbq", "QVLMModifier": "qvlm"}
# Modules of the package that no cell imports (the command line, its checkpoint inspector, the test fixtures): outside
# every cell key, so work on the CLI does not invalidate results. Each cell checks after it ran that it
# did not import one of them (modules_outside_key); if it did, it is recorded stale.
OUTSIDE_CELL_CODE = ("cli", "__main__.py", "inspect_ckpt.py", "testing")
# Modules of the evaluation lab (this folder, package qvlm_eval) that a cell's job runs.
LAB_CELL_CODE = ("main_job.py", "metrics.py", "default_model.py")


def code_files(recipe_text: str | None = None) -> list[Path]:
    """The code a cell runs: src/qvlm_modifiers minus the method subpackages its recipe does not name
    (all of them when ``recipe_text`` is None) and minus :data:`OUTSIDE_CELL_CODE`, and the lab
    modules of :data:`LAB_CELL_CODE`. Not this file: the arguments it passes to the job are part of
    the cell key (:func:`job_arguments`)."""
    src = REPO / "src" / "qvlm_modifiers"
    skipped = set()
    if recipe_text is not None:
        skipped = {src / pkg for name, pkg in METHOD_PACKAGES.items() if name not in recipe_text}
    skipped |= {src / name for name in OUTSIDE_CELL_CODE if (src / name).is_dir()}
    outside = {src / name for name in OUTSIDE_CELL_CODE}
    files = [f for f in sorted(src.rglob("*.py")) if f not in outside and not any(d in f.parents for d in skipped)]
    return files + [EVAL_DIR / name for name in LAB_CELL_CODE]


def modules_outside_key() -> set[str]:
    """The modules of :data:`OUTSIDE_CELL_CODE` this process has imported."""
    names = {"qvlm_modifiers." + Path(name).stem for name in OUTSIDE_CELL_CODE}
    return names & set(sys.modules)


def code_text(source: str) -> str:
    """A module's source without its comments and docstrings, trailing spaces and blank lines: what
    the code does, so that editing a comment or a docstring does not restale cells. Comment spans come
    from ``tokenize`` and docstring spans from ``ast`` (both report the same positions on every Python
    version); the rest of the text is kept as written."""
    import ast
    import io
    import tokenize

    lines = source.splitlines()
    spans = []  # (first line, first column, last line, end column); lines 1-based
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            spans.append((*tok.start, *tok.end))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                spans.append((first.lineno, first.col_offset, first.end_lineno, first.end_col_offset))
    for l0, c0, l1, c1 in sorted(spans, reverse=True):  # last span first: earlier positions stay valid
        lines[l0 - 1 : l1] = [lines[l0 - 1][:c0] + lines[l1 - 1][c1:]]
    return "\n".join(line.rstrip() for line in lines if line.strip())


def code_version(recipe_text: str | None = None) -> str:
    """Hash of :func:`code_files` with comments and docstrings left out (:func:`code_text`); the
    recipe text itself is part of the cell key."""
    digest = hashlib.sha256()
    for path in code_files(recipe_text):
        digest.update(str(path.relative_to(REPO)).encode())
        digest.update(code_text(path.read_text()).encode())
    return digest.hexdigest()[:16]


def model_fingerprint(model_dir: str | Path) -> str:
    """Hash of a model folder's weights and configs: a retrained or re-assembled model is a new model
    even at the same path."""
    digest = hashlib.sha256()
    folder = Path(model_dir)
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# job arguments that only say where outputs go (the model is keyed as path@fingerprint instead)
_PLACE_ARGUMENTS = ("--model", "--recipe", "--fp-cache", "--results-dir", "--output-dir")


def job_arguments(cell: dict, path: str, settings: dict, group_size: int | None, out_dir: Path,
                  recipe_file: str) -> list[str]:
    """eval/main_job.py's argv for one cell."""
    argv = [
        "--model", path, "--recipe", recipe_file,
        "--vqa-questions", str(settings.get("vqa_questions", 200)),
        "--kl-rows", str(settings.get("kl_rows", 32)),
        "--ppl-tokens", str(settings.get("ppl_tokens", 2048)),
        "--calib-samples", str(settings.get("calib_samples", 64)),
        "--batch-size", str(settings.get("batch_size", 16)),
        "--seed", str(settings.get("seed", 0)),
        "--fp-cache", str(out_dir / ".fp_cache"),
        "--results-dir", str(out_dir), "--output-dir", str(out_dir / "quantized" / cell["id"]),
    ]
    if cell["calib_seed"] is not None:
        argv += ["--calib-seed", str(cell["calib_seed"])]
    if group_size:
        argv += ["--group-size", str(group_size)]
    return argv


def keyed_arguments(argv: list[str]) -> list[str]:
    """The job arguments that can change a number (``argv`` without :data:`_PLACE_ARGUMENTS`)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _PLACE_ARGUMENTS:
            skip = True
        else:
            kept.append(arg)
    return kept


def cell_key(recipe_text: str, model: str, settings: dict, version: str, job_args: list[str] | None = None) -> str:
    payload = json.dumps({"recipe": recipe_text, "model": model, "settings": settings, "code": version,
                          "job": job_args}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def plan_cell(cell: dict, path: str, fingerprint: str | None, settings: dict, group_size: int | None,
              out_dir: Path) -> dict:
    """What this script decides about a cell, and its key: recipe file and effective text, code
    version, job argv."""
    recipe_file = resolve_recipe(cell["recipe"])
    recipe_text = effective_recipe_text(recipe_file, group_size)
    version = code_version(recipe_text)
    argv = job_arguments(cell, path, settings, group_size, out_dir, recipe_file)
    key = cell_key(recipe_text, f"{path}@{fingerprint}", {**settings, "calib_seed": cell["calib_seed"]}, version,
                   keyed_arguments(argv))
    return {"recipe_file": recipe_file, "recipe_text": recipe_text, "version": version, "argv": argv, "key": key}


def parse_cells(config: dict) -> list[dict]:
    """``cells:`` entries ``{method, scheme, recipe[, calib_seed]}``; a bare ``recipes:`` list also works."""
    cells = []
    for entry in config.get("cells") or [{"recipe": r} for r in config.get("recipes", [])]:
        if isinstance(entry, str):
            entry = {"recipe": entry}
        if "recipe" not in entry:
            raise ValueError(f"experiments: cell {entry!r} has no 'recipe'")
        cell = {"recipe": entry["recipe"], "method": entry.get("method", Path(entry["recipe"]).stem),
                "scheme": entry.get("scheme", "?"), "calib_seed": entry.get("calib_seed")}
        cell["id"] = Path(cell["recipe"]).stem + (f"@seed{cell['calib_seed']}" if cell["calib_seed"] is not None else "")
        cells.append(cell)
    ids = [c["id"] for c in cells]
    if len(set(ids)) != len(ids):
        raise ValueError(f"experiments: duplicate cells {sorted({i for i in ids if ids.count(i) > 1})}")
    return cells


def resolve_recipe(recipe: str) -> str:
    """A path, an eval/recipes/<name>.yaml, or a shipped recipe name."""
    local = EVAL_DIR / "recipes" / f"{recipe}.yaml"
    return str(local) if not Path(recipe).is_file() and local.is_file() else main_job.recipe_location(recipe)


def effective_recipe_text(recipe_file: str, group_size: int | None) -> str:
    text = Path(recipe_file).read_text()
    if group_size:
        from qvlm_modifiers.recipe_check import override_group_size

        new_text, changed = override_group_size(text, group_size)
        if changed:
            return new_text
    return text


def stale_cells(results: dict, fingerprint: str | None = None) -> dict[str, str]:
    """Cells of a results.json computed by other code (the code each cell runs, see
    :func:`code_version`) or on another model (same path, other files): id -> reason."""
    stale = {}
    for cid, cell in results.get("cells", {}).items():
        if cell.get("code_version") != code_version(cell.get("recipe_text")):
            stale[cid] = "code"
        elif fingerprint is not None and cell.get("model_fingerprint") != fingerprint:
            stale[cid] = "model files"
    return stale


def code_changed_during_run(version_at_process_start: str, recipe_text: str, version_at_cell_start: str,
                            imported_outside_key: list[str] | tuple[str, ...] = ()) -> str | None:
    """Why a finished cell's code version cannot be trusted (``None`` if it can): the code it is
    keyed on changed between the process start (what this process imported) and the cell's start,
    or during the cell, or the cell imported a module that the key leaves out
    (:data:`OUTSIDE_CELL_CODE`). Method subpackages enter by name, so the group-size override (which
    does not change Modifier names) does not matter here."""
    end = code_version(recipe_text)
    if version_at_process_start != version_at_cell_start:
        return "the code changed on disk after this process imported it"
    if end != version_at_cell_start:
        return "the code changed on disk while the cell ran"
    if imported_outside_key:
        return f"it imported {', '.join(imported_outside_key)}, which the cell key leaves out (OUTSIDE_CELL_CODE)"
    return None


def rekey_cells(results: dict, cells: list[dict], path: str, fingerprint: str | None, settings: dict,
                group_size: int | None, out_dir: Path, reason: str, commit: str | None) -> list[str]:
    """Re-key the cells that are stale *only* because the code they ran was edited (recipe, model files,
    settings and job arguments unchanged: their stored key is reproduced with their stored code
    version). Their numbers are kept; ``rekeyed`` records the old key and code version, the reason
    (the evidence that the code still means the same thing) and when. Returns the re-keyed cell ids."""
    done_ids = []
    for cell in cells:
        done = results["cells"].get(cell["id"])
        if done is None:
            continue
        plan = plan_cell(cell, path, fingerprint, settings, group_size, out_dir)
        if done.get("key") == plan["key"]:
            continue
        old_key = cell_key(plan["recipe_text"], f"{path}@{fingerprint}", {**settings, "calib_seed": cell["calib_seed"]},
                           done.get("code_version"), keyed_arguments(plan["argv"]))
        if old_key != done.get("key"):
            continue  # something besides the code changed: only a rerun can tell
        history = done.setdefault("rekeyed", [])
        history.append({"from_key": done["key"], "from_code_version": done["code_version"], "reason": reason,
                        "git_commit": commit,
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        done.update(key=plan["key"], code_version=plan["version"])
        done_ids.append(cell["id"])
    return done_ids


def list_state(done: dict | None, key: str, fingerprint: str | None, force: bool) -> str:
    """A cell's state for --list: done, stale (other code or model files: needs --rerun-stale), will
    rerun (its recipe, settings or job arguments changed) or to run."""
    if done is None:
        return "to run"
    if done.get("key") == key:
        return "done, rerun by --force" if force else "done"
    why = stale_cells({"cells": {"c": done}}, fingerprint).get("c")
    if why:
        return f"stale ({why})"
    return "will rerun (recipe, settings or job arguments changed)"


def check_versions(results: dict, results_file: Path, rerun_stale: bool, fingerprint: str | None = None) -> None:
    """Refuse a results.json with :func:`stale_cells` unless ``rerun_stale``."""
    stale = stale_cells(results, fingerprint)
    if stale and not rerun_stale:
        listed = ", ".join(f"{cid} ({why})" for cid, why in sorted(stale.items()))
        raise StaleResultsError(
            f"{results_file} holds cells computed by other code or on another model: {listed}. "
            f"Recompute them with --rerun-stale, or write to another folder with --results-root "
            f"(--list shows every cell's state)."
        )


# ------------------------------------------------------------------------------------------ output
def _acc(r: dict) -> str:
    return f"{100 * r['accuracy']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"


def _scheme_rank(scheme: str) -> int:
    return SCHEME_ORDER.index(scheme) if scheme in SCHEME_ORDER else len(SCHEME_ORDER)


def _group_size_note(cells: dict) -> str:
    sizes = sorted({str(c.get("group_size")) for c in cells.values() if c.get("group_size")})
    if not sizes:
        return "Group sizes are the recipes' own (no `group_size` override for this model)."
    return (f"Group-quantized weights use group size {'/'.join(sizes)}: the model's `group_size` in "
            "experiments.yaml replaces the group size of every group-quantized recipe (the shipped ones use "
            "128); per-channel recipes stay per channel.")


def markdown_table(cells: dict) -> str:
    if not cells:
        return "(no finished cells)\n"
    first = next(iter(cells.values()))
    fp = first["fp"]
    lines = [
        f"Full precision: accuracy {_acc(fp['vqa'])} on {fp['vqa']['n']} easy-vqa test questions, "
        f"perplexity {fp['ppl']['perplexity']:.2f} (Lee corpus, {fp['ppl']['tokens']} tokens), "
        f"{fp['size_bytes'] / 2**20:.1f} MiB.",
        "",
        _group_size_note(cells),
        "",
        "| scheme | method | cell | accuracy % (95% CI) | Δ vs FP | same answer as FP | KL(FP‖Q) mean / max | ppl | size MiB | calib s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(cells, key=lambda c: (_scheme_rank(cells[c]["scheme"]), cells[c]["method"], c))
    for cid in order:
        cell = cells[cid]
        q = cell["quantized"]
        delta = 100 * (q["vqa"]["accuracy"] - cell["fp"]["vqa"]["accuracy"])
        lines.append(
            f"| {cell['scheme']} | {cell['method']} | {cid} | {_acc(q['vqa'])} | {delta:+.1f} | "
            f"{100 * cell['answers_identical_to_fp']:.1f}% | {q['kl']['kl_mean']:.4f} / {q['kl']['kl_max']:.2f} | "
            f"{q['ppl']['perplexity']:.2f} | {q['size_bytes'] / 2**20:.1f} | {q['calibration']['wall_s']:.0f} | "
            f"{q['calibration']['peak_rss_bytes'] / 2**30:.2f} |")
    versions = sorted({f"{c.get('git_commit')} ({c.get('code_version')})" for c in cells.values()})
    lines += ["", f"Code: {', '.join(versions)}. " + Q4_NOTE.replace("\n", " ")]
    return "\n".join(lines) + "\n"


def scheme_bits(scheme: str) -> tuple[int, int]:
    """``"W4A16"`` -> (4, 16): weight and activation bits of a scheme name (16 = activations unquantized)."""
    match = re.fullmatch(r"W(\d+)A(\d+)", scheme)
    if not match:
        raise ValueError(f"scheme {scheme!r} is not of the form W<bits>A<bits> (e.g. W4A16): fix the cell's "
                         "`scheme` in experiments.yaml")
    return int(match.group(1)), int(match.group(2))


def plot_lines(cells: dict) -> dict:
    """The lines :func:`plot` draws: ``{(panel, method): [(x, accuracy %, KL, scheme), ...]}`` sorted by x.

    Panel ``"weight-only"`` puts weight bits on x (W3A16 -> 3, W4A16 -> 4). Panel ``"weight-activation"``
    puts the schemes in order of activation bits, then weight bits (W4A4 -> 0, W6A6 -> 1, W4A8 -> 2,
    W8A8 -> 3 when all four are present), so a line never joins a weight-only scheme to a
    weight-activation one. Seed reruns (``@seed`` cells) are left out."""
    main_cells = {cid: cell for cid, cell in cells.items() if "@seed" not in cid}
    bits = {cell["scheme"]: scheme_bits(cell["scheme"]) for cell in main_cells.values()}
    activation_schemes = sorted((s for s, (_, a) in bits.items() if a < 16), key=lambda s: bits[s][::-1])
    lines: dict = {}
    for cell in main_cells.values():
        w_bits, a_bits = bits[cell["scheme"]]
        if a_bits >= 16:
            panel, x = "weight-only", w_bits
        else:
            panel, x = "weight-activation", activation_schemes.index(cell["scheme"])
        q = cell["quantized"]
        lines.setdefault((panel, cell["method"]), []).append(
            (x, 100 * q["vqa"]["accuracy"], max(q["kl"]["kl_mean"], 1e-5), cell["scheme"]))
    return {key: sorted(points) for key, points in lines.items()}


def plot(cells: dict, out_dir: Path) -> list[Path]:
    """metrics.png: accuracy and KL vs bits, one line per method, in a weight-only row and a
    weight-activation row, and calibration wall time per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = plot_lines(cells)
    if not lines:
        return []
    methods = sorted({method for _, method in lines})
    # 10 colours x 4 markers x 2 dash styles: every method its own look, even past 10 methods
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style = {m: dict(color=colours[i % len(colours)], marker="osD^"[(i // len(colours)) % 4],
                     ls="-" if (i // len(colours)) % 2 == 0 else "--")
             for i, m in enumerate(methods)}
    hatch = {m: "" if style[m]["ls"] == "-" else "//" for m in methods}  # the bars' second look
    fig = plt.figure(figsize=(18, 9))
    grid = fig.add_gridspec(2, 3)
    panels = ("weight-only", "weight-activation")
    fp_acc = 100 * next(iter(cells.values()))["fp"]["vqa"]["accuracy"]
    for row, panel in enumerate(panels):
        ax_acc, ax_kl = fig.add_subplot(grid[row, 0]), fig.add_subplot(grid[row, 1])
        ticks: dict = {}  # x -> the scheme drawn there
        for (p, method), points in sorted(lines.items()):
            if p != panel:
                continue
            xs = [x for x, *_ in points]
            ax_acc.plot(xs, [a for _, a, _, _ in points], label=method, **style[method])
            ax_kl.plot(xs, [k for _, _, k, _ in points], label=method, **style[method])
            ticks.update({x: scheme for x, _, _, scheme in points})
        ax_acc.axhline(fp_acc, color="k", ls=":", label="full precision")
        ax_kl.set_yscale("log")
        for ax in (ax_acc, ax_kl):
            ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)], fontsize=8)
            ax.set_xlabel("weight bits" if panel == "weight-only" else "scheme, by activation then weight bits")
        ax_acc.set_ylabel(f"{panel}: easy-vqa accuracy (%)")
        ax_kl.set_ylabel("KL(FP || Q), answer tokens (nats, log)")
        ax_acc.legend(fontsize=6, ncol=2)
    ax_time = fig.add_subplot(grid[:, 2])
    order = sorted((c for c in cells if "@seed" not in c),
                   key=lambda c: (_scheme_rank(cells[c]["scheme"]), cells[c]["method"]))
    ax_time.barh(order, [cells[c]["quantized"]["calibration"]["wall_s"] for c in order],
                 color=[style[cells[c]["method"]]["color"] for c in order],
                 hatch=[hatch[cells[c]["method"]] for c in order])
    ax_time.invert_yaxis()
    ax_time.tick_params(axis="y", labelsize=7)
    ax_time.set_xlabel("calibration wall time (s)")
    fig.suptitle("LM weights come from a Q4_1 GGUF: W4 looks easier than on a bf16 model", fontsize=9)
    fig.tight_layout()
    path = out_dir / "metrics.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(EVAL_DIR / "experiments.yaml"))
    parser.add_argument("--only", "--recipes", dest="only", nargs="*", help="only these cell ids (recipe names)")
    parser.add_argument("--vqa-questions", type=int)
    parser.add_argument("--force", action="store_true", help="rerun cells that are already done")
    parser.add_argument("--rerun-stale", action="store_true",
                        help="recompute cells that results.json holds from other code (default: refuse)")
    parser.add_argument("--list", action="store_true", help="print the cells and whether each is done, run nothing")
    parser.add_argument("--report", action="store_true",
                        help="rewrite results.md and metrics.png from results.json, run nothing")
    parser.add_argument("--results-root", default=str(EVAL_DIR / "results"), help="results go to ROOT/<model>/")
    parser.add_argument("--rekey-as-equivalent", metavar="REASON",
                        help="declare today's code equivalent to the code of every cell that is stale for code only: "
                             "recompute its key, keep its numbers, record the old key and REASON (the evidence) "
                             "in the cell; run nothing")
    args = parser.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    settings = dict(config.get("settings", {}))
    if args.vqa_questions:
        settings["vqa_questions"] = args.vqa_questions
    cells = parse_cells(config)
    if args.only:
        unknown = sorted(set(args.only) - {c["id"] for c in cells})
        if unknown:
            print(f"error: no cell {unknown} in {args.config}; cells: {', '.join(c['id'] for c in cells)}",
                  file=sys.stderr)
            return 2
        cells = [c for c in cells if c["id"] in args.only]
    commit = git_commit()
    # the code as this process imports it: a cell is only recorded as current when the files it is
    # keyed on are the same at process start, at its start and at its end (cells run in this process,
    # so an edit during the run would otherwise label old imported code with the new files' hash)
    code_at_start = {cell["id"]: code_version(effective_recipe_text(resolve_recipe(cell["recipe"]), None))
                     for cell in cells}
    failures = 0
    for model in config["models"]:
        name = model["name"]
        path = str(main_job.DEFAULT_MODEL_DIR) if model["path"] == "default" else model["path"]
        if model["path"] == "default" and not args.report:
            from qvlm_eval.default_model import ensure_default_model

            ensure_default_model(path)  # re-assembled when the committed vision weights changed
        fingerprint = model_fingerprint(path) if Path(path).is_dir() else None
        group_size = model.get("group_size")
        out_dir = Path(args.results_root) / name
        out_dir.mkdir(parents=True, exist_ok=True)
        results_file = out_dir / "results.json"
        results = json.loads(results_file.read_text()) if results_file.exists() else {"cells": {}}
        if args.report:
            (out_dir / "results.md").write_text(f"# {name}\n\n" + markdown_table(results["cells"]))
            written = plot(results["cells"], out_dir)
            print(f"[run_experiments] {name}: wrote {out_dir / 'results.md'} and {', '.join(map(str, written))} "
                  f"from {len(results['cells'])} cells", flush=True)
            continue
        if args.rekey_as_equivalent:
            rekeyed = rekey_cells(results, cells, path, fingerprint, settings, group_size, out_dir,
                                  args.rekey_as_equivalent, commit)
            results_file.write_text(json.dumps(results, indent=2, default=str))
            print(f"[run_experiments] {name}: re-keyed {len(rekeyed)} cells: {', '.join(rekeyed) or '(none)'}",
                  flush=True)
            continue
        if args.list:
            listed = {c["id"] for c in cells}
            for cid, why in sorted(stale_cells(results, fingerprint).items()):
                if cid not in listed:
                    print(f"[run_experiments] {name} x {cid}: stale ({why}), not in this run's cells; a run "
                          f"refuses until it is recomputed (--rerun-stale) or removed", flush=True)
        else:
            try:
                check_versions(results, results_file, args.rerun_stale or args.force, fingerprint)
            except StaleResultsError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
        for index, cell in enumerate(cells, 1):
            plan = plan_cell(cell, path, fingerprint, settings, group_size, out_dir)
            recipe_file, version, key = plan["recipe_file"], plan["version"], plan["key"]
            done = results["cells"].get(cell["id"])
            tag = f"[run_experiments {index}/{len(cells)}] {name} x {cell['id']} ({cell['method']} {cell['scheme']})"
            if done and done.get("key") == key and not args.force:
                print(f"{tag}: done (key {key}), skipped", flush=True)
                continue
            if args.list:
                print(f"{tag}: {list_state(done, key, fingerprint, args.force)}", flush=True)
                continue
            print(f"{tag}: running", flush=True)
            started = time.time()
            outside_before = modules_outside_key()
            rc = main_job.main(plan["argv"])
            record_path = out_dir / f"main_job_{Path(recipe_file).stem}.json"
            if rc != 0 or not record_path.exists():
                print(f"{tag}: FAILED (exit {rc})", file=sys.stderr)
                failures += 1
                continue
            record = json.loads(record_path.read_text())
            record_path.unlink()  # folded into results.json
            edited = code_changed_during_run(code_at_start[cell["id"]], plan["recipe_text"], version,
                                             sorted(modules_outside_key() - outside_before))
            if edited:
                print(f"{tag}: WARNING: {edited}; recorded as stale", file=sys.stderr)
                version = f"edited during the run ({version})"
            record.update(key=key, code_version=version, model_fingerprint=fingerprint, git_commit=commit, method=cell["method"],
                          scheme=cell["scheme"], calib_seed=cell["calib_seed"], group_size=group_size,
                          date=datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
                          wall_s=round(time.time() - started, 1), machine=machine())
            for part in ("fp", "quantized"):
                record[part]["vqa"].pop("predictions", None)
            results["cells"][cell["id"]] = record
            results_file.write_text(json.dumps(results, indent=2, default=str))
            (out_dir / "results.md").write_text(f"# {name}\n\n" + markdown_table(results["cells"]))
            plot(results["cells"], out_dir)
        if not args.list:
            (out_dir / "results.md").write_text(f"# {name}\n\n" + markdown_table(results["cells"]))
            plot(results["cells"], out_dir)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
