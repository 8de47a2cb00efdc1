"""Run the experiment matrix of eval/experiments.yaml (models x cells x calibration seeds), skipping finished runs.

    python eval/run_experiments.py                          # every (cell, seed) run of experiments.yaml
    python eval/run_experiments.py --only rtn_w4a16 mbq_w3  # just these cells (all their seeds)
    python eval/run_experiments.py --only mbq_w3@seed2      # one seed of a cell
    python eval/run_experiments.py --list                   # every run, whether it is done, and the budget
    python eval/run_experiments.py --budget                 # how many runs are pending, and roughly how long
    python eval/run_experiments.py --report                 # rewrite results.md / metrics.png / comparisons

A cell is one recipe (a shipped recipe name or a YAML under eval/recipes/) with a method and a
scheme label, run at one or more calibration seeds (``seeds: [0, 1, 2]`` on the cell, its group or the
whole file; main_job's --calib-seed draws other calibration rows, the evaluation rows stay fixed). Each
(cell, seed) run is eval/main_job.py: quantize with the recipe through qvlm_modifiers.oneshot -> save
-> reload -> metrics (the full-precision metrics are computed once per model and cached). The run at
the base seed (settings.seed) has the cell's plain id and the key it always had; another seed s is
``<cell>@seed<s>`` with the key the former ``calib_seed: s`` noise cells had. Results go to
eval/results/<model>/: results.json (every run, keyed; ``summary``: mean and interval over seeds per
cell; ``comparisons``: the paired comparisons of experiments.yaml, see qvlm_eval.paired), results.md
(table by scheme, per-seed runs, comparisons) and metrics.png (accuracy and KL vs scheme, one line per
method, error bars over seeds; calibration time per cell).

A run is skipped when results.json holds it under the same key: a hash of the recipe text (after
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


def default_model_path(model: dict) -> str:
    """Folder of a ``path: default`` model: the default model of its ``testbed`` (v1, v2; default
    ``qvlm_eval.default_model.DEFAULT_TESTBED``) in ``eval/.models/``."""
    from qvlm_eval import default_model as dm

    return str(dm.MODELS_DIR / dm.testbed(model.get("testbed")).model_name)


#: settings passed to main_job only when set (so cells of configurations without them keep their keys)
_OPTIONAL_SETTINGS = {"kl_caption_rows": "--kl-caption-rows", "calib_caption_fraction": "--calib-caption-fraction",
                      "device": "--device"}


def results_folder(model_name: str, device: str) -> str:
    """A model's results folder: ``<model>`` for the CPU matrix, ``<model>-cuda`` (``-cuda1``...) for
    runs on a GPU, which are cached and reported apart (their numbers are not bit-equal to CPU ones)."""
    return model_name if device == "cpu" else f"{model_name}-{device.replace(':', '')}"


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
    for key, flag in _OPTIONAL_SETTINGS.items():
        if settings.get(key) is not None:
            argv += [flag, str(settings[key])]
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


def _seed_list(value, where: str) -> list[int]:
    seeds = value if isinstance(value, (list, tuple)) else [value]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"experiments: {where}: seeds must be a non-empty list of non-negative integers, got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"experiments: {where}: repeated seeds in {value!r}")
    return list(seeds)


def parse_cells(config: dict, seeds: list[int] | None = None) -> list[dict]:
    """The (cell, seed) runs of a matrix, in order: ``{recipe, method, scheme, calib_seed, id, cell, seed}``.

    ``cells:`` entries are ``{method, scheme, recipe[, seeds]}`` (a bare ``recipes:`` list also works),
    or groups ``{group: name, cells: [...], <defaults>}`` whose other fields (``seeds``, ``scheme``,
    ``method``) are defaults of their cells. ``seeds`` (calibration seeds) comes from the cell, else its
    group, else the top-level ``seeds:``, else ``[settings.seed]``; ``seeds`` (the --seeds option)
    replaces all of them. The run at the base seed (``settings.seed``, default 0) passes no
    ``--calib-seed`` and keeps the cell's plain id (``gptq_w3a16``) and its old key; another seed runs
    as ``--calib-seed s`` with id ``gptq_w3a16@seed<s>``, exactly the id and key of the former
    ``calib_seed: s`` noise cells, so their results stay valid. A legacy entry with ``calib_seed: s``
    is still one run (``@seed<s>``, even for s = the base seed)."""
    base = int((config.get("settings") or {}).get("seed", 0))
    top = _seed_list(config["seeds"], "top-level seeds") if config.get("seeds") is not None else [base]
    override = _seed_list(seeds, "--seeds") if seeds is not None else None
    runs: list[dict] = []

    def expand(entries, defaults: dict) -> None:
        for entry in entries:
            if isinstance(entry, str):
                entry = {"recipe": entry}
            if "cells" in entry:
                inherited = {k: v for k, v in entry.items() if k not in ("cells", "group")}
                expand(entry["cells"] or [], {**defaults, **inherited})
                continue
            own, entry = entry, {**defaults, **entry}
            if "recipe" not in entry:
                raise ValueError(f"experiments: cell {entry!r} has no 'recipe'")
            stem = Path(entry["recipe"]).stem
            common = {"recipe": entry["recipe"], "method": entry.get("method", stem), "scheme": entry.get("scheme", "?"),
                      "cell": stem}
            if entry.get("calib_seed") is not None:
                if "seeds" in own:
                    raise ValueError(f"experiments: cell {stem}: give either calib_seed (one legacy run) or seeds")
                cs = entry["calib_seed"]
                runs.append({**common, "calib_seed": cs, "id": f"{stem}@seed{cs}", "seed": cs})
                continue
            cell_seeds = override or (_seed_list(entry["seeds"], f"cell {stem}") if entry.get("seeds") is not None
                                      else top)
            for s in cell_seeds:
                runs.append({**common, "calib_seed": None if s == base else s,
                             "id": stem if s == base else f"{stem}@seed{s}", "seed": s})

    expand(config.get("cells") or [{"recipe": r} for r in config.get("recipes", [])], {})
    ids = [c["id"] for c in runs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"experiments: duplicate cells {sorted({i for i in ids if ids.count(i) > 1})} (a legacy "
                         "calib_seed entry repeats a seed of its cell's seeds?)")
    return runs


def select_runs(runs: list[dict], only: list[str]) -> tuple[list[dict], list[str]]:
    """The runs named in ``only`` by run id (``mbq_w3@seed1``) or cell id (``mbq_w3``: all its seeds),
    and the names that match nothing."""
    names = set(only)
    unknown = sorted(names - {r["id"] for r in runs} - {r["cell"] for r in runs})
    return [r for r in runs if r["id"] in names or r["cell"] in names], unknown


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


def record_cell(run_id: str, record: dict) -> str:
    """The cell a results.json entry belongs to: its ``cell`` field, else its id without ``@seed<s>``."""
    return record.get("cell") or run_id.split("@seed")[0]


def record_seed(record: dict) -> int:
    """The calibration seed a record ran at: its ``seed`` field, else ``calib_seed``, else the job's
    ``--seed`` (main_job draws the calibration rows with --seed when no --calib-seed is given)."""
    if record.get("seed") is not None:
        return int(record["seed"])
    if record.get("calib_seed") is not None:
        return int(record["calib_seed"])
    return int((record.get("args") or {}).get("seed") or 0)


def group_by_cell(cells: dict) -> dict[str, dict[int, tuple[str, dict]]]:
    """results.json ``cells`` -> ``{cell: {seed: (run id, record)}}``. Two records of one cell at one
    seed (a legacy ``calib_seed: 0`` cell beside the plain one) keep the plain id's."""
    grouped: dict = {}
    for rid, record in cells.items():
        seeds = grouped.setdefault(record_cell(rid, record), {})
        seed = record_seed(record)
        if seed not in seeds or "@seed" in seeds[seed][0]:
            seeds[seed] = (rid, record)
    return {cell: dict(sorted(seeds.items())) for cell, seeds in grouped.items()}


def summarize_cells(cells: dict) -> dict:
    """Per cell: its seeds and run ids, and :func:`qvlm_eval.paired.seed_interval` (mean over seeds; no
    interval for 1 seed, min..max for 2, t-based 95% for 3+) of the accuracy, KL mean and perplexity."""
    from qvlm_eval.paired import seed_interval

    summary = {}
    for cell, seeds in group_by_cell(cells).items():
        records = [rec for _, rec in seeds.values()]
        summary[cell] = {
            "method": records[0]["method"], "scheme": records[0]["scheme"], "seeds": list(seeds),
            "runs": [rid for rid, _ in seeds.values()],
            "accuracy": seed_interval([r["quantized"]["vqa"]["accuracy"] for r in records]),
            "kl_mean": seed_interval([r["quantized"]["kl"]["kl_mean"] for r in records]),
            "perplexity": seed_interval([r["quantized"]["ppl"]["perplexity"] for r in records]),
        }
    return summary


def resolve_comparisons(config: dict, runs: list[dict]) -> list[dict]:
    """``comparisons:`` entries -> ``[{name, scheme, a, b}]`` with a and b cell ids. An entry is
    ``{a: <method>, b: <method>, schemes: [...]}`` (each method label at each scheme must name exactly
    one cell of the matrix) or ``{a: <cell id>, b: <cell id>}``."""
    cells: dict[str, dict] = {}
    for run in runs:
        cells.setdefault(run["cell"], run)
    by_label: dict = {}
    for cid, run in cells.items():
        by_label.setdefault((run["method"], run["scheme"]), []).append(cid)
    pairs = []
    for entry in config.get("comparisons") or []:
        if "a" not in entry or "b" not in entry:
            raise ValueError(f"experiments: comparison {entry!r} needs 'a' and 'b'")
        if entry.get("schemes"):
            for scheme in entry["schemes"]:
                ids = []
                for side in ("a", "b"):
                    found = by_label.get((entry[side], scheme), [])
                    if len(found) != 1:
                        raise ValueError(f"experiments: comparison {entry[side]!r} at {scheme} matches "
                                         f"{found or 'no cell'}; methods at {scheme}: "
                                         f"{sorted(m for m, s in by_label if s == scheme)}")
                    ids.append(found[0])
                pairs.append({"name": f"{entry['a']} vs {entry['b']}", "scheme": scheme, "a": ids[0], "b": ids[1]})
        else:
            for side in ("a", "b"):
                if entry[side] not in cells:
                    raise ValueError(f"experiments: comparison cell {entry[side]!r} is not a cell of the matrix")
            a, b = cells[entry["a"]], cells[entry["b"]]
            pairs.append({"name": f"{a['method']} vs {b['method']}",
                          "scheme": a["scheme"] if a["scheme"] == b["scheme"] else f"{a['scheme']} / {b['scheme']}",
                          "a": entry["a"], "b": entry["b"]})
    return pairs


def compute_comparisons(cells: dict, pairs: list[dict], n_resamples: int = 10000) -> list[dict]:
    """:func:`qvlm_eval.paired.compare_runs` for each pair, on the records of results.json: KL difference
    A - B with a paired bootstrap CI (rows resampled jointly across seeds), accuracy difference (with a
    bootstrap CI when per-question hits exist) and McNemar's exact test per seed."""
    from qvlm_eval.paired import compare_runs

    grouped = group_by_cell(cells)
    out = []
    for pair in pairs:
        runs_a = {s: rec for s, (_, rec) in grouped.get(pair["a"], {}).items()}
        runs_b = {s: rec for s, (_, rec) in grouped.get(pair["b"], {}).items()}
        out.append({**pair, **compare_runs(runs_a, runs_b, names=(pair["a"], pair["b"]), n_resamples=n_resamples)})
    return out


def _interval(iv: dict, scale: float, digits: int) -> str:
    """A seed summary: mean (lo..hi) for 2 seeds, mean ± half-width (t95) for 3+."""
    mean = f"{scale * iv['mean']:.{digits}f}"
    if iv["kind"] == "min..max":
        return f"{mean} ({scale * iv['low']:.{digits}f}..{scale * iv['high']:.{digits}f})"
    if iv["kind"] == "t95":
        return f"{mean} ± {scale * (iv['high'] - iv['mean']):.{digits}f}"
    return mean


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _run_row(scheme, method, cid, q, fp, agree, seeds_text) -> str:
    return (f"| {scheme} | {method} | {cid} | {_acc(q['vqa'])} | {100 * (q['vqa']['accuracy'] - fp['vqa']['accuracy']):+.1f} | "
            f"{100 * agree:.1f}% | {q['kl']['kl_mean']:.4f} / {q['kl']['kl_max']:.2f} | "
            f"{q['ppl']['perplexity']:.2f} | {q['size_bytes'] / 2**20:.1f} | {q['calibration']['wall_s']:.0f} | "
            f"{q['calibration']['peak_rss_bytes'] / 2**30:.2f} | {seeds_text} |")


TO_RUN = "to run"


def _signed(value: float, digits: int, scale: float = 1.0) -> str:
    return f"{scale * value:+.{digits}f}"


def comparison_rows(comparisons: list[dict]) -> list[str]:
    """The comparisons table of results.md; a pair with a side not run reads "to run", a pair whose
    records lack per-row data says which field of which record is missing."""
    lines = ["| comparison (A vs B) | scheme | A / B cells | seeds | KL A−B mean (95% CI) | accuracy A−B pts (95% CI) "
             "| McNemar b / c, p (per seed) | note |",
             "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        head = f"| {c['name']} | {c['scheme']} | {c['a']} / {c['b']} |"
        if c["status"] in (TO_RUN, "no common seed"):
            lines.append(f"{head} {TO_RUN} | {TO_RUN} | {TO_RUN} | {TO_RUN} | {c.get('missing', '')} |")
            continue
        seeds = ",".join(map(str, c["seeds"]))
        notes = []
        kl = c["kl"]
        if "missing" in kl:
            kl_text = "no per-row KL"
            notes.append(kl["missing"])
        else:
            kl_text = f"{_signed(kl['mean_diff'], 4)} [{_signed(kl['ci_low'], 4)}, {_signed(kl['ci_high'], 4)}]"
            if kl.get("weighting", "tokens") != "tokens":
                kl_text += " rows"
                notes.append(f"KL weighted by {kl['weighting']}")
        hits = c["hits"]
        if c["status"] == "missing per-row data":
            notes = [c["missing"]]
        if "missing" in hits:
            acc_text = (f"{_signed(c['accuracy_diff'], 1, 100)} (no CI)" if c.get("accuracy_diff") is not None
                        else "no accuracy")
            mc_text = "no per-question hits"
            if c["status"] != "missing per-row data":
                notes.append(hits["missing"])
        else:
            d = hits["accuracy_diff"]
            acc_text = f"{_signed(d['mean_diff'], 1, 100)} [{_signed(d['ci_low'], 1, 100)}, {_signed(d['ci_high'], 1, 100)}]"
            mc_text = "; ".join(f"{m['b']} / {m['c']}, p={m['p_value']:.3g}" + (f" (s{m['seed']})" if len(c["seeds"]) > 1 else "")
                                for m in hits["mcnemar"])
        if c.get("unpaired_seeds"):
            notes.append("unpaired seeds left out: " + ", ".join(f"{k} {v}" for k, v in c["unpaired_seeds"].items()))
        lines.append(f"{head} {seeds} | {kl_text} | {acc_text} | {mc_text} | {'; '.join(notes)} |")
    return lines


def markdown_table(cells: dict, planned: list[dict] | None = None, comparisons: list[dict] | None = None) -> str:
    """results.md: one row per cell (its seeds summarized), planned cells not run yet as "to run", the
    per-seed runs of cells with several seeds, and the paired comparisons."""
    if not cells and not planned:
        return "(no finished cells)\n"
    planned = planned or []
    grouped = group_by_cell(cells)
    lines = []
    if cells:
        fp = next(iter(cells.values()))["fp"]
        lines += [
            f"Full precision: accuracy {_acc(fp['vqa'])} on {fp['vqa']['n']} easy-vqa test questions, "
            f"perplexity {fp['ppl']['perplexity']:.2f} (Lee corpus, {fp['ppl']['tokens']} tokens), "
            f"{fp['size_bytes'] / 2**20:.1f} MiB.", "", _group_size_note(cells), ""]
    lines += [
        "One row per cell. With one calibration seed the accuracy interval is the bootstrap over questions; with "
        "several, numbers are means over seeds followed by (min..max) for 2 seeds or ± the half-width of a "
        "t-based 95% interval over seeds (3+); KL max, size and peak RSS are the largest over seeds. "
        "`seeds` lists the seeds done and the ones still to run.",
        "",
        "| scheme | method | cell | accuracy % (95% CI) | Δ vs FP | same answer as FP | KL(FP‖Q) mean / max | ppl | size MiB | calib s | peak RSS GiB | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    planned_seeds: dict[str, list[int]] = {}
    labels: dict[str, tuple[str, str]] = {}
    for run in planned:
        planned_seeds.setdefault(run["cell"], []).append(run["seed"])
        labels.setdefault(run["cell"], (run["scheme"], run["method"]))
    for cid, seeds in grouped.items():
        first = next(iter(seeds.values()))[1]
        labels[cid] = (first["scheme"], first["method"])
    order = sorted(labels, key=lambda c: (_scheme_rank(labels[c][0]), labels[c][1], c))
    multi = []
    for cid in order:
        scheme, method = labels[cid]
        done = grouped.get(cid, {})
        pending = [s for s in planned_seeds.get(cid, []) if s not in done]
        seeds_text = ",".join(map(str, done)) + (f" ({','.join(map(str, pending))} {TO_RUN})" if pending else "")
        if not done:
            lines.append(f"| {scheme} | {method} | {cid} | {TO_RUN} |  |  |  |  |  |  |  | {seeds_text.strip()} |")
            continue
        records = [rec for _, rec in done.values()]
        fp = records[0]["fp"]
        if len(records) == 1:
            lines.append(_run_row(scheme, method, cid, records[0]["quantized"], fp, records[0]["answers_identical_to_fp"],
                                  seeds_text))
            continue
        multi.append(cid)
        from qvlm_eval.paired import seed_interval

        qs = [r["quantized"] for r in records]
        acc = seed_interval([q["vqa"]["accuracy"] for q in qs])
        kl = seed_interval([q["kl"]["kl_mean"] for q in qs])
        ppl = seed_interval([q["ppl"]["perplexity"] for q in qs])
        lines.append(
            f"| {scheme} | {method} | {cid} | {_interval(acc, 100, 1)} | {100 * (acc['mean'] - fp['vqa']['accuracy']):+.1f} | "
            f"{100 * _mean(r['answers_identical_to_fp'] for r in records):.1f}% | "
            f"{_interval(kl, 1, 4)} / {max(q['kl']['kl_max'] for q in qs):.2f} | {_interval(ppl, 1, 2)} | "
            f"{max(q['size_bytes'] for q in qs) / 2**20:.1f} | {_mean(q['calibration']['wall_s'] for q in qs):.0f} | "
            f"{max(q['calibration']['peak_rss_bytes'] for q in qs) / 2**30:.2f} | {seeds_text} |")
    if multi:
        lines += ["", "Per-seed runs of the cells with several seeds:", "",
                  "| scheme | method | run | accuracy % (95% CI) | Δ vs FP | same answer as FP | KL(FP‖Q) mean / max | ppl | size MiB | calib s | peak RSS GiB | seed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for cid in multi:
            for seed, (rid, rec) in grouped[cid].items():
                lines.append(_run_row(rec["scheme"], rec["method"], rid, rec["quantized"], rec["fp"],
                                      rec["answers_identical_to_fp"], str(seed)))
    if comparisons:
        lines += ["", "Paired comparisons (A − B; negative KL and positive accuracy favour A). KL: mean over seeds of the "
                  "per-row KL difference on the held-out KL rows, weighted by each row's answer tokens (so it is the "
                  "difference of the token-averaged KL means; 'rows' where the token counts are not recorded), "
                  "percentile bootstrap 95% CI resampling rows with the "
                  "same indices at every seed (calibration-seed spread not included). Accuracy: mean difference over "
                  "seeds, bootstrap over questions the same way. McNemar: exact two-sided binomial test on the "
                  "discordant questions, b = A right and B wrong, c = A wrong and B right, one test per seed.", ""]
        lines += comparison_rows(comparisons)
    if cells:
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


KL_FLOOR = 1e-5  # the KL axis is logarithmic


def plot_lines(cells: dict) -> dict:
    """The lines :func:`plot` draws: ``{(panel, method): [(x, accuracy %, KL, scheme, errors), ...]}``
    sorted by x, one point per cell: the mean over its seeds, and ``errors`` = ``{"acc": (low, high),
    "kl": (low, high)}`` (min..max for 2 seeds, t-based 95% for 3+; None for one seed).

    Panel ``"weight-only"`` puts weight bits on x (W3A16 -> 3, W4A16 -> 4). Panel ``"weight-activation"``
    puts the schemes in order of activation bits, then weight bits (W4A4 -> 0, W6A6 -> 1, W4A8 -> 2,
    W8A8 -> 3 when all four are present), so a line never joins a weight-only scheme to a
    weight-activation one."""
    summary = summarize_cells(cells)
    bits = {s["scheme"]: scheme_bits(s["scheme"]) for s in summary.values()}
    activation_schemes = sorted((s for s, (_, a) in bits.items() if a < 16), key=lambda s: bits[s][::-1])
    lines: dict = {}
    for s in summary.values():
        w_bits, a_bits = bits[s["scheme"]]
        if a_bits >= 16:
            panel, x = "weight-only", w_bits
        else:
            panel, x = "weight-activation", activation_schemes.index(s["scheme"])
        acc, kl = s["accuracy"], s["kl_mean"]
        errors = None
        if acc["n"] > 1:
            errors = {"acc": (100 * acc["low"], 100 * acc["high"]),
                      "kl": (max(kl["low"], KL_FLOOR), max(kl["high"], KL_FLOOR))}
        lines.setdefault((panel, s["method"]), []).append(
            (x, 100 * acc["mean"], max(kl["mean"], KL_FLOOR), s["scheme"], errors))
    return {key: sorted(points, key=lambda p: p[0]) for key, points in lines.items()}


def plot(cells: dict, out_dir: Path) -> list[Path]:
    """metrics.png: accuracy and KL vs bits, one line per method, in a weight-only row and a
    weight-activation row, with error bars over calibration seeds where a cell has several; and
    calibration wall time per cell (mean over seeds, min..max whiskers)."""
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
            xs = [pt[0] for pt in points]
            ax_acc.plot(xs, [pt[1] for pt in points], label=method, **style[method])
            ax_kl.plot(xs, [pt[2] for pt in points], label=method, **style[method])
            for x, acc, kl, _, errors in points:
                if errors:
                    for ax, y, (lo, hi) in ((ax_acc, acc, errors["acc"]), (ax_kl, kl, errors["kl"])):
                        ax.errorbar([x], [y], yerr=[[max(y - lo, 0)], [max(hi - y, 0)]], fmt="none",
                                    ecolor=style[method]["color"], capsize=3, label="_seeds")
            ticks.update({pt[0]: pt[3] for pt in points})
        ax_acc.axhline(fp_acc, color="k", ls=":", label="full precision")
        ax_kl.set_yscale("log")
        for ax in (ax_acc, ax_kl):
            ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)], fontsize=8)
            ax.set_xlabel("weight bits" if panel == "weight-only" else "scheme, by activation then weight bits")
        ax_acc.set_ylabel(f"{panel}: easy-vqa accuracy (%)")
        ax_kl.set_ylabel("KL(FP || Q), answer tokens (nats, log)")
        ax_acc.legend(fontsize=6, ncol=2)
    ax_time = fig.add_subplot(grid[:, 2])
    grouped = group_by_cell(cells)
    first = {c: next(iter(seeds.values()))[1] for c, seeds in grouped.items()}
    order = sorted(grouped, key=lambda c: (_scheme_rank(first[c]["scheme"]), first[c]["method"]))
    walls = [[rec["quantized"]["calibration"]["wall_s"] for _, rec in grouped[c].values()] for c in order]
    means = [_mean(w) for w in walls]
    ax_time.barh([c + (f" ({len(w)} seeds)" if len(w) > 1 else "") for c, w in zip(order, walls)], means,
                 xerr=[[m - min(w) for m, w in zip(means, walls)], [max(w) - m for m, w in zip(means, walls)]],
                 color=[style[first[c]["method"]]["color"] for c in order],
                 hatch=[hatch[first[c]["method"]] for c in order])
    ax_time.invert_yaxis()
    ax_time.tick_params(axis="y", labelsize=7)
    ax_time.set_xlabel("calibration wall time (s), mean over seeds")
    fig.suptitle("LM weights come from a Q4_1 GGUF: W4 looks easier than on a bf16 model; error bars: spread over "
                 "calibration seeds (min..max for 2, t 95% for 3+)", fontsize=9)
    fig.tight_layout()
    path = out_dir / "metrics.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def estimate_wall_s(run: dict, cells: dict) -> tuple[float | None, str]:
    """Expected wall time of a pending run from the recorded ones: the same cell at other seeds, else
    the same method (median over its schemes), else every recorded run (median); (None, "no record")
    when nothing is recorded."""
    import statistics

    def walls(pred):
        return [rec["wall_s"] for rid, rec in cells.items() if rec.get("wall_s") and pred(rid, rec)]

    same_cell = walls(lambda rid, rec: record_cell(rid, rec) == run["cell"])
    if same_cell:
        return _mean(same_cell), "this cell"
    same_method = walls(lambda rid, rec: rec.get("method") == run["method"])
    if same_method:
        return statistics.median(same_method), "this method"
    every = walls(lambda rid, rec: True)
    if every:
        return statistics.median(every), "all runs"
    return None, "no record"


def budget_lines(name: str, states: list[tuple[dict, str]], cells: dict) -> list[str]:
    """--budget / the end of --list: how many (cell, seed) runs are pending (to run, will rerun,
    stale) and roughly how long they take at the recorded wall times, per cell and in all."""
    pending = [(run, state) for run, state in states if not state.startswith("done")
               or state == "done, rerun by --force"]
    counts: dict[str, int] = {}
    for _, state in pending:
        kind = state.split(" (")[0]
        counts[kind] = counts.get(kind, 0) + 1
    total, unknown = 0.0, 0
    per_cell: dict[str, list] = {}
    for run, _ in pending:
        wall, _source = estimate_wall_s(run, cells)
        entry = per_cell.setdefault(run["cell"], [[], 0.0, 0])
        entry[0].append(run["seed"])
        if wall is None:
            unknown += 1
            entry[2] += 1
        else:
            total += wall
            entry[1] += wall
    done = len(states) - len(pending)
    head = (f"[budget] {name}: {len(pending)} of {len(states)} (cell, seed) runs pending"
            + (f" ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})" if counts else "")
            + f", {done} done; about {total / 3600:.1f} h at the recorded wall times"
            + (f" ({unknown} runs without any record to estimate from)" if unknown else ""))
    lines = [head]
    for cell, (seeds, wall, missing) in per_cell.items():
        lines.append(f"[budget]   {cell}: seeds {','.join(map(str, seeds))} ~{wall / 60:.0f} min"
                     + (f" (+{missing} not estimated)" if missing else ""))
    return lines


def write_report(results: dict, out_dir: Path, name: str, runs: list[dict], pairs: list[dict]) -> list[Path]:
    """Fold the seed summaries and the paired comparisons into ``results`` (results.json's
    ``summary`` and ``comparisons``) and write results.json, results.md and metrics.png."""
    results["summary"] = summarize_cells(results["cells"])
    results["comparisons"] = compute_comparisons(results["cells"], pairs)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "results.md").write_text(f"# {name}\n\n" + markdown_table(results["cells"], runs, results["comparisons"]))
    return plot(results["cells"], out_dir) if results["cells"] else []


def machine() -> dict:
    """What ran the cell. Not keyed, but Q-VLM's and GPTQ's results differ between CPUs (float rounding
    flips near-ties), so compare runs of one ``cpu`` only."""
    import torch

    return {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def cpu_model(info: str | None = None) -> str | None:
    """The CPU's model name and its wide-vector extensions, from ``info`` (``/proc/cpuinfo``'s text,
    read when not given; elsewhere ``platform.processor()`` or ``None``)."""
    if info is None:
        try:
            info = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor() or None
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wide = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(wide) or 'no AVX2'})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(EVAL_DIR / "experiments.yaml"))
    parser.add_argument("--only", "--recipes", dest="only", nargs="*",
                        help="only these cells (all their seeds: mbq_w3) or runs (one seed: mbq_w3@seed1)")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="run every cell at these calibration seeds (replaces the seeds of experiments.yaml)")
    parser.add_argument("--vqa-questions", type=int)
    parser.add_argument("--device", default="cpu",
                        help="run the jobs on this device (main_job.py --device: cuda, cuda:N, auto). Not cpu: the "
                             "device joins each run's settings and so its key, and GPU runs are cached apart from "
                             "the CPU matrix")
    parser.add_argument("--force", action="store_true", help="rerun cells that are already done")
    parser.add_argument("--rerun-stale", action="store_true",
                        help="recompute cells that results.json holds from other code (default: refuse)")
    parser.add_argument("--list", action="store_true",
                        help="print every (cell, seed) run and whether it is done, and the budget; run nothing")
    parser.add_argument("--budget", action="store_true",
                        help="print how many (cell, seed) runs are pending and their estimated time; run nothing")
    parser.add_argument("--report", action="store_true",
                        help="rewrite results.md, metrics.png and the summary/comparisons of results.json from its "
                             "cells, run nothing")
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
    # main_job's own check: "auto" resolved (a key never says "auto"), a bad name or CUDA without a GPU refused
    # before anything runs; a report or listing of a GPU matrix needs no GPU
    from qvlm_modifiers.errors import QVLMError

    reading = args.report or args.list or args.budget
    try:
        device = args.device if reading and args.device != "auto" else str(main_job.resolve_device(args.device))
    except QVLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if device != "cpu":  # only then, so that CPU runs keep their keys
        settings["device"] = device
    try:
        all_runs = parse_cells(config, args.seeds)
        pairs = resolve_comparisons(config, all_runs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cells = all_runs
    if args.only:
        cells, unknown = select_runs(all_runs, args.only)
        if unknown:
            print(f"error: no cell {unknown} in {args.config}; cells: {', '.join(dict.fromkeys(c['cell'] for c in all_runs))}",
                  file=sys.stderr)
            return 2
    listing = args.list or args.budget
    commit = git_commit()
    # the code as this process imports it: a cell is only recorded as current when the files it is
    # keyed on are the same at process start, at its start and at its end (cells run in this process,
    # so an edit during the run would otherwise label old imported code with the new files' hash)
    running = not (args.report or listing or args.rekey_as_equivalent)
    code_at_start = {cell["id"]: code_version(effective_recipe_text(resolve_recipe(cell["recipe"]), None))
                     for cell in cells} if running else {}
    failures = 0
    base_settings = settings
    for model in config["models"]:
        name = model["name"]
        settings = {**base_settings, **model.get("settings", {})}  # a model's own settings win
        path = default_model_path(model) if model["path"] == "default" else model["path"]
        if model["path"] == "default" and not args.report:
            from qvlm_eval.default_model import ensure_default_model

            # re-assembled when the committed vision weights changed
            ensure_default_model(path, testbed_name=model.get("testbed"))
        # (the report reads results.json only: no need to hash the model's files)
        fingerprint = model_fingerprint(path) if Path(path).is_dir() and not args.report else None
        group_size = model.get("group_size")
        out_dir = Path(args.results_root) / results_folder(name, device)
        out_dir.mkdir(parents=True, exist_ok=True)
        results_file = out_dir / "results.json"
        results = json.loads(results_file.read_text()) if results_file.exists() else {"cells": {}}
        if args.report:
            written = write_report(results, out_dir, name, all_runs, pairs)
            print(f"[run_experiments] {name}: wrote {out_dir / 'results.md'}, {results_file}"
                  f"{''.join(', ' + str(w) for w in written)} from {len(results['cells'])} cells", flush=True)
            continue
        if args.rekey_as_equivalent:
            rekeyed = rekey_cells(results, cells, path, fingerprint, settings, group_size, out_dir,
                                  args.rekey_as_equivalent, commit)
            results_file.write_text(json.dumps(results, indent=2, default=str))
            print(f"[run_experiments] {name}: re-keyed {len(rekeyed)} cells: {', '.join(rekeyed) or '(none)'}",
                  flush=True)
            continue
        if listing:
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
        states = []
        for index, cell in enumerate(cells, 1):
            plan = plan_cell(cell, path, fingerprint, settings, group_size, out_dir)
            recipe_file, version, key = plan["recipe_file"], plan["version"], plan["key"]
            done = results["cells"].get(cell["id"])
            tag = f"[run_experiments {index}/{len(cells)}] {name} x {cell['id']} ({cell['method']} {cell['scheme']})"
            if listing:
                state = list_state(done, key, fingerprint, args.force)
                states.append((cell, state))
                if args.list:
                    print(f"{tag}: {state}" + (f" (key {key})" if state == "done" else ""), flush=True)
                continue
            if done and done.get("key") == key and not args.force:
                print(f"{tag}: done (key {key}), skipped", flush=True)
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
                          scheme=cell["scheme"], calib_seed=cell["calib_seed"], seed=cell["seed"], cell=cell["cell"],
                          group_size=group_size,
                          date=datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
                          wall_s=round(time.time() - started, 1), machine=machine())
            for part in ("fp", "quantized"):
                record[part]["vqa"].pop("predictions", None)  # the per-question hits stay (paired tests)
            results["cells"][cell["id"]] = record
            write_report(results, out_dir, name, all_runs, pairs)
        if listing:
            for line in budget_lines(name, states, results["cells"]):
                print(line, flush=True)
        else:
            write_report(results, out_dir, name, all_runs, pairs)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
