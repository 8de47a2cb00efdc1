"""Saving quantized VLMs so that they reload exactly: our save path.

The upstream bug this module fixes
----------------------------------
compressed-tensors 0.19 (``QuantizationConfig.from_pretrained`` -> ``_map_to_checkpoint_names``)
writes the ``quantization_config.ignore`` list of ``config.json`` with *on-disk* module names.
transformers 5 saves several VLMs with their legacy checkpoint names (LLaVA:
``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.lm_head``) but its
compressed-tensors quantizer matches ``ignore`` against the *in-memory* names of the freshly built
model (``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``lm_head``). Nothing matches,
so on reload the vision tower, projector and lm_head are treated as quantized: their bf16
tensors are reported as unexpected keys and the modules are re-initialized with random weights.
Measured with llm-compressor's own ``oneshot(..., output_dir=...)`` + W4A16 on the tiny zoo
models: LLaVA, Qwen2-VL, Qwen2.5-VL reload *silently* wrong (vision tower re-initialized);
LLaVA-OneVision and Gemma 3 crash on reload (SigLIP's weight init reads the missing ``.weight``
of the wrongly "quantized" vision Linears); Idefics3 keeps its names and is fine.

A second, smaller gap: upstream lists only modules whose *exact* class name was quantized
somewhere, while the reload matches ``targets: [Linear]`` along the MRO, so a ``Linear`` subclass
left unquantized (``NonDynamicallyQuantizableLinear`` in SigLIP's attention-pooling head,
LLaVA-OneVision) is quantized on reload and the load crashes.

The fix keeps the checkpoint *standard* compressed-tensors: ``ignore`` stays a plain list of
explicit module names; for every unquantized module that a reload would target
(:func:`qvlm_modifiers.names.in_memory_ignore`) we add its in-memory name and its on-disk name (renamed exactly as
transformers' ``save_pretrained`` renames its weights) next to the names compressed-tensors wrote
(:func:`qvlm_modifiers.names.reload_safe_ignore`). Why this is correct for every reader:

- transformers 5 (``CompressedTensorsHfQuantizer`` -> ``apply_quantization_config`` ->
  ``compressed_tensors.utils.match.match_named_modules``) matches in-memory names exactly or by
  ``re.match``: the added names match, the on-disk ones are inert.
- vLLM's compressed-tensors config first maps ``ignore`` through the model's
  ``hf_to_vllm_mapper`` (prefix renames such as ``model.vision_tower.`` -> ``vision_tower.``), then
  matches exactly or by ``re.match`` (``should_ignore_layer``): the on-disk legacy names are already
  vLLM names, the in-memory names map onto the same vLLM names. Duplicates are harmless.
- Entries that match nothing are ignored by both (compressed-tensors only warns for unmatched
  *targets*).

Our save path (:func:`save_pretrained`) additionally is atomic: everything is written into a
temporary sibling directory that is renamed onto ``output_dir`` only when model, config fix and
processor are all written; any exception removes the temporary directory, so no half-written
checkpoint is ever left behind.

llm-compressor's own ``oneshot(..., output_dir=...)``
------------------------------------------------------
``import qvlm_modifiers`` calls :func:`qvlm_modifiers.upstream.install_oneshot_save_hook` once. llm-compressor has no
supported extension point for saving: its ``oneshot`` calls
``llmcompressor.entrypoints.utils.modify_save_pretrained(model)`` during pre-processing, which
replaces ``model.save_pretrained`` *on that model instance* with llm-compressor's compressed save.
The hook rebinds that one module attribute to a function that calls llm-compressor's original and
then wraps the same instance method once more (:func:`qvlm_modifiers.upstream.wrap_model_save`) with :func:`fix_saved_config`, which rewrites
``config.json``'s ``ignore`` as above after llm-compressor wrote it. Scope: only models that go
through llm-compressor's ``oneshot``/``Oneshot`` while ``qvlm_modifiers`` is imported; nothing
else in llm-compressor, compressed-tensors or transformers is patched. For models whose on-disk
and in-memory names agree (text-only LLMs, Idefics3) the rewrite adds nothing. It is idempotent
(installing twice or wrapping a model twice is a no-op) and :func:`qvlm_modifiers.upstream.uninstall_oneshot_save_hook`
removes it. That path writes directly into ``output_dir`` as llm-compressor does (not atomic);
use :func:`qvlm_modifiers.oneshot` for the atomic, checked save.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from torch import nn

from qvlm_modifiers.errors import CheckpointError, OutputDirError
from qvlm_modifiers.names import checkpoint_names, in_memory_ignore, reload_safe_ignore

__all__ = [
    "check_output_dir",
    "save_pretrained",
    "fix_saved_config",
]

CONFIG_NAME = "config.json"


# --------------------------------------------------------------------------- ignore list fix
def fix_saved_config(save_dir: str | os.PathLike, model: nn.Module) -> bool:
    """Rewrite ``save_dir/config.json`` so its ``quantization_config.ignore`` also names the
    in-memory modules (see module docstring). Returns True when the file was changed.

    A checkpoint without ``quantization_config`` is left untouched. Idempotent.
    """
    path = Path(save_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{path} was not written by save_pretrained, so the quantization config cannot be "
            "fixed. Check the disk space and permissions of the output directory and save again."
        )
    with open(path) as f:
        config = json.load(f)
    qconfig = config.get("quantization_config")
    # Q-VLM block partition (QVLMModifier sets model.config.qvlm_blocks): llm-compressor's
    # resave_config rewrites config.json from the original file and would drop it
    qvlm_blocks = getattr(getattr(model, "config", None), "qvlm_blocks", None)
    blocks_changed = qvlm_blocks is not None and config.get("qvlm_blocks") != qvlm_blocks
    if blocks_changed:
        config["qvlm_blocks"] = qvlm_blocks
    if not isinstance(qconfig, dict) and not blocks_changed:
        return False
    if isinstance(qconfig, dict):
        old = list(qconfig.get("ignore") or [])
        in_memory = in_memory_ignore(model)
        new = reload_safe_ignore(old, checkpoint_names(model, in_memory) + in_memory)
        if new == old and not blocks_changed:
            return False
        qconfig["ignore"] = new
    tmp = path.with_name(f".{CONFIG_NAME}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return True


# --------------------------------------------------------------------------- output directory
def _nearest_existing_dir(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def _probe_writable(directory: Path) -> None:
    """Create and remove a file in ``directory`` (``os.access`` lies for root)."""
    fd, probe = tempfile.mkstemp(prefix=".qvlm-write-probe-", dir=directory)
    os.close(fd)
    os.unlink(probe)


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate ``output_dir`` before any work is done; returns it as an absolute ``Path``.

    Raises :class:`OutputDirError` when it is a file, exists and is not empty without
    ``overwrite``, or when it (or the directory that would contain it) cannot be written.
    """
    out = Path(output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise OutputDirError(
            f"Output directory {str(out)!r} exists and is a file, not a directory. Choose another "
            "output directory or remove the file."
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputDirError(
            f"Output directory {str(out)!r} exists and is not empty. Choose a new or empty "
            "directory, or pass overwrite=True (CLI: --overwrite) to replace its contents."
        )
    # The checkpoint is written into a temporary sibling and renamed, so the parent must be
    # writable (and the directory itself when it exists).
    anchor = _nearest_existing_dir(out.parent)
    for directory in ([out] if out.is_dir() else []) + [anchor]:
        if not directory.is_dir():
            raise OutputDirError(
                f"Output directory {str(out)!r} cannot be created: {str(directory)!r} is not a "
                "directory. Choose an output directory under an existing, writable directory."
            )
        try:
            _probe_writable(directory)
        except OSError as err:
            raise OutputDirError(
                f"Output directory {str(out)!r} is not writable ({str(directory)!r}: "
                f"{err.strerror or err}). Choose a directory you can write to, or fix its "
                "permissions."
            ) from err
    return out


# --------------------------------------------------------------------------- the save path
def _commit(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` onto ``out``; an existing ``out`` is replaced as one step."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_written(directory: Path) -> None:
    names = {p.name for p in directory.iterdir()}
    if CONFIG_NAME not in names or not any(n.endswith(".safetensors") for n in names):
        raise CheckpointError(
            f"Saving into {str(directory)!r} produced no config.json or no *.safetensors file; "
            "nothing was written to the output directory. Check disk space and save again."
        )


def save_pretrained(
    model: nn.Module,
    processor: Any,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    save_compressed: bool = True,
    **save_kwargs: Any,
) -> Path:
    """Save a quantized VLM (compressed-tensors) and its processor so that
    ``AutoModelForImageTextToText.from_pretrained(output_dir)`` reloads it exactly.

    :param model: the model after calibration (llm-compressor ``oneshot`` or Modifiers applied)
    :param processor: the processor to save next to it (``None`` to skip)
    :param output_dir: target directory; must be new or empty unless ``overwrite``
    :param overwrite: replace the contents of an existing non-empty ``output_dir``
    :param save_compressed: pack the weights (compressed-tensors formats); ``False`` writes
        fake-quantized dense weights
    :param save_kwargs: passed to the model's ``save_pretrained`` (e.g. ``max_shard_size``)
    :return: the output directory

    Atomic: written into a temporary sibling directory, renamed onto ``output_dir`` at the end;
    on any exception the temporary directory is removed and ``output_dir`` is left as it was.
    """
    from llmcompressor.transformers.compression.compressed_tensors_utils import (
        modify_save_pretrained,
    )

    out = check_output_dir(output_dir, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    # mkdtemp creates the directory 0700; the checkpoint gets the mode a plain mkdir would give it.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        modify_save_pretrained(model)  # llm-compressor's compressed save, per instance
        model.save_pretrained(str(tmp), save_compressed=save_compressed, **save_kwargs)
        fix_saved_config(tmp, model)
        if processor is not None:
            processor.save_pretrained(str(tmp))
        _check_written(tmp)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
