"""Train the default model's vision encoder + connector (the LM, SmolLM2-135M-Instruct, stays frozen).

Data: the easy-vqa package's train split (shape images with questions, single-word answers), a caption
per labelled easy-vqa image composed from its own facts (``qvlm_eval.captions``), plus the photographs
shipped with scikit-image / matplotlib, questioned and captioned by hand in
``eval/data/photo_captions.jsonl``. Loss: per row, the mean cross-entropy on the assistant turn (answer
or caption, and the closing ``<|im_end|>``), averaged over rows; plus a stage-1 alignment regulariser.
The trainable weights and the optimizer state are float32; the frozen LM runs in float32 with
``--no-bf16`` (CPUs without AVX512-BF16/AMX, where bf16 is emulated: 2.6x faster than bf16 on the
first Intel CI machine, 20x on the AMD EPYC one, 3 vs 60 s per batch-4 step) or under bf16 autocast
(GPUs, CPUs with AMX).

One command, seeded; on CPU bitwise reproducible given the same torch build and thread count; on CUDA
not bitwise reproducible (attention backward is non-deterministic there)::

    nice -n 10 python eval/train_vision.py --no-bf16   # test bed v2 -> eval/weights/v2/ (CPU run: its log)
    python eval/train_vision.py --device cuda           # the same on a GPU (minutes)
    python eval/train_vision.py --measure 3 --no-bf16   # just time 3 steps and exit
    python eval/train_vision.py --stage1-weights /tmp/s1.safetensors --lr 1e-3   # reuse stage 1 across variants

The log (``train_vision.log``) is written next to the weights. Test bed v1's committed weights
(``eval/weights/smolvlm_tiny_vision.safetensors``, 4 image tokens) came from this script at commit
fcc15a4 (token-mean loss, no captions; CPU reproduction in ``eval/results/train_vision_cpu/``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from qvlm_eval import default_model as dm
from qvlm_eval.captions import (CAPTION_PROMPT, COLORS, PHOTO_FILE, SHAPES, compose_caption, easy_vqa_labels,
                                photo_path)

EVAL_DIR = Path(__file__).resolve().parent
ANSWER_END = "<|im_end|>"


def load_photo_image(ref: str):
    """``skimage:NAME`` / ``matplotlib:NAME`` -> RGB PIL image from the installed package's data."""
    from PIL import Image

    return Image.open(photo_path(ref)).convert("RGB")


def photo_examples(path: Path = PHOTO_FILE) -> list[dict]:
    """Question/answer and caption examples from the hand-written photo file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    examples, captioned = [], set()
    for row in rows:
        examples.append({"image": row["image"], "question": row["question"], "answer": row["answer"]})
        if row["image"] not in captioned:
            captioned.add(row["image"])
            examples.append({"image": row["image"], "question": CAPTION_PROMPT, "answer": row["caption"]})
    return examples


def question_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "colour" if answer in COLORS else "shape"


def description_ids(tokenizer, descriptions: list[str], n_tokens: int) -> torch.Tensor:
    """Token ids of each description, cycled to n_tokens."""
    out = []
    for text in descriptions:
        ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"][:n_tokens]
        out.append((ids * n_tokens)[:n_tokens])
    return torch.tensor(out)


def description_targets(model, tokenizer, descriptions: list[str], n_tokens: int) -> torch.Tensor:
    """Stage-1 targets: the LM's input embeddings of each description's tokens, cycled to n_tokens."""
    table = model.model.text_model.embed_tokens.weight.detach().float()
    return table[description_ids(tokenizer, descriptions, n_tokens)]


def prompt_text(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def encode_example(processor, question: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt (image tokens expanded) + answer + <|im_end|>, and where the answer starts."""
    tok = processor.tokenizer
    prompt = prompt_text(processor, question)
    image_block = (
        processor.fake_image_token + processor.global_image_tag
        + processor.image_token * processor.image_seq_len + processor.fake_image_token
    )
    prompt = prompt.replace(processor.image_token, image_block, 1)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer + ANSWER_END, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, len(prompt_ids)


def pixel_tensors(processor, images) -> tuple[torch.Tensor, torch.Tensor]:
    out = processor.image_processor(images=[[im] for im in images], return_tensors="pt")
    return out["pixel_values"][:, 0], out["pixel_attention_mask"][:, 0]


def collate(examples, pixels, pixel_masks, pad_id: int, device: torch.device | str = "cpu"):
    """Right-padded batch; ``targets`` = -100 except answer tokens (predicted from the previous position)."""
    length = max(len(e["ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    targets = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["ids"])
        ids[row, :n] = torch.tensor(ex["ids"])
        attention[row, :n] = 1
        targets[row, ex["answer_start"] - 1 : n - 1] = ids[row, ex["answer_start"] : n]
    index = torch.tensor([e["pixel_index"] for e in examples])
    batch = {
        "input_ids": ids,
        "attention_mask": attention,
        "pixel_values": pixels[index].unsqueeze(1),
        "pixel_attention_mask": pixel_masks[index].unsqueeze(1),
        "targets": targets,
    }
    return {key: value.to(device) for key, value in batch.items()}


def answer_loss_and_hits(model, batch):
    """Mean over rows of each row's mean CE on its answer tokens; per-example 'all answer tokens are the
    argmax' (= greedy exact match)."""
    out = model.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        pixel_attention_mask=batch["pixel_attention_mask"],
        use_cache=False,
    )
    targets = batch["targets"]
    keep = targets != -100
    logits = model.lm_head(out.last_hidden_state[keep]).float()  # lm_head only where it is needed
    token_loss = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="none")
    # mean over rows of each row's mean: a 25-token caption weighs as much as a one-word answer
    row = keep.nonzero()[:, 0]
    per_row = torch.zeros(targets.shape[0], device=logits.device).index_add_(0, row, token_loss)
    loss = (per_row / keep.sum(1).clamp(min=1)).mean()
    correct = torch.zeros_like(targets, dtype=torch.bool)
    correct[keep] = logits.argmax(-1) == targets[keep]
    hits = (correct | ~keep).all(dim=1)
    return loss, hits


QUESTION_TYPES = ("yes/no", "colour", "shape")


def batch_composition(batch_size: int, photo_fraction: float, type_mix: str,
                      caption_fraction: float = 0.0) -> tuple[int, int, list[int]]:
    """Stage-2 batch: (photo examples, easy-vqa caption examples, [yes/no, colour, shape] easy-vqa
    questions) per batch.

    ``type_mix`` is "a,b,c", the shares of the three question types; the rounding remainder goes to yes/no."""
    try:
        mix = [float(v) for v in type_mix.split(",")]
    except ValueError:
        mix = []
    if len(mix) != 3 or not all(math.isfinite(v) and v >= 0 for v in mix) or sum(mix) <= 0:
        raise SystemExit(f"--type-mix needs three non-negative shares (yes/no, colour, shape), e.g. 0.6,0.2,0.2; "
                         f"got {type_mix!r}")
    if not 0 <= photo_fraction < 1:
        raise SystemExit(f"--photo-fraction is the share of photo examples per batch, in [0, 1), e.g. 0.06; "
                         f"got {photo_fraction}")
    if not 0 <= caption_fraction < 1 or photo_fraction + caption_fraction >= 1:
        raise SystemExit(f"--caption-fraction is the share of easy-vqa caption examples per batch, in [0, 1) and "
                         f"leaving room for questions beside --photo-fraction, e.g. 0.12; got {caption_fraction}")
    n_photo = max(0, round(batch_size * photo_fraction))
    n_caption = max(0, round(batch_size * caption_fraction))
    n_vqa = batch_size - n_photo - n_caption
    counts = [int(n_vqa * share / sum(mix)) for share in mix]
    counts[0] += n_vqa - sum(counts)
    return n_photo, n_caption, counts


def stage1_key(args, data_digest: str) -> dict:
    """What stage 1's result depends on (the key of its cache): the seed, the --align-* options, the
    device and thread count (rounding), and ``data_digest`` (the stage-1 images, their descriptions and
    the vision config; see :func:`stage1_data_digest`)."""
    key = {k: getattr(args, k) for k in ("seed", "align_steps", "align_batch_size", "align_lr", "align_ce",
                                         "align_temperature", "align_ce_tokens", "threads")}
    key["device"] = str(torch.device(args.device))
    key["data"] = data_digest
    return key


def stage1_data_digest(align_rows, align_text, val_images, vision_config: dict) -> str:
    """sha256 of stage 1's inputs other than the options: which pixel rows it trains on, their
    descriptions, the held-out images and the vision tower's config."""
    import hashlib

    blob = json.dumps([list(align_rows), list(align_text), sorted(val_images), vision_config], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_stage1_cache(path: Path, vision_state: dict[str, torch.Tensor], key: dict) -> None:
    """Write the stage-1 weights with their key, atomically (a temp file renamed into place), so that runs
    started together on one cache path never read a half-written file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.float().cpu().contiguous() for k, v in vision_state.items()}, str(tmp),
              metadata={"stage1_key": json.dumps(key, sort_keys=True)})
    os.replace(tmp, path)


def load_stage1_cache(path: Path, model: torch.nn.Module, key: dict) -> None:
    """Load a stage-1 cache into ``model``; SystemExit naming the problem and the fix when it was made
    with another key, is not a stage-1 cache, or lacks vision weights of this model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "stage1_key" not in metadata:
        raise SystemExit(f"{path} is not a stage-1 cache (no stage1_key metadata; a final --output file?). "
                         f"Fix: pass another --stage1-weights path, or delete it.")
    saved = json.loads(metadata["stage1_key"])
    if saved != key:
        changed = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
        raise SystemExit(f"{path} was made with other stage-1 inputs ({', '.join(changed)} differ). "
                         f"Fix: delete it, or pass another --stage1-weights path.")
    state = load_file(str(path))
    if set(state) != set(dm.vision_state_dict(model)):  # the trainable part's names, as saved
        raise SystemExit(f"{path} does not hold this model's vision weights. Fix: delete it.")
    model.load_state_dict(state, strict=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="train the default model's vision encoder + connector")
    parser.add_argument("--testbed", default="v2", choices=sorted(dm.TESTBEDS),
                        help="which default-model version to train the vision side of (v1 is archived: its committed "
                             "weights came from this script at commit fcc15a4, before captions and the per-row loss)")
    parser.add_argument("--align-steps", type=int, default=1500, help="stage 1: image tokens -> description embeddings")
    parser.add_argument("--align-batch-size", type=int, default=32)
    parser.add_argument("--align-lr", type=float, default=2e-3)
    parser.add_argument("--align-ce", type=float, default=1.0, help="weight of the stage-1 token-decoding loss")
    parser.add_argument("--align-temperature", type=float, default=0.05)
    parser.add_argument("--align-ce-tokens", type=int, default=8,
                        help="stage 1: image tokens that the decode loss covers (the description cycles, so 8 tokens "
                             "hold it several times); the MSE covers all of them")
    parser.add_argument("--steps", type=int, default=500, help="stage 2: answer cross-entropy through the frozen LM")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--stage2-align", type=float, default=0.5,
                        help="stage 2: weight of the stage-1 loss (MSE + token decoding) kept as a regulariser, so the "
                             "image tokens stay readable as colour/shape words while the answer loss trains them")
    parser.add_argument("--stage2-align-tokens", type=int, default=2,
                        help="stage 2: the regulariser holds only the first N image tokens (one copy of the colour "
                             "and shape words); the others are free to learn what the yes/no questions need")
    parser.add_argument("--type-mix", default="0.6,0.2,0.2",
                        help="stage 2: share of yes/no, colour and shape questions per batch (easy-vqa train is "
                             "74/13/13%%; colour questions were at chance with the natural mix)")
    parser.add_argument("--photo-fraction", type=float, default=0.06, help="share of photo examples per batch")
    parser.add_argument("--caption-fraction", type=float, default=0.12,
                        help="share of easy-vqa caption examples (qvlm_eval.captions) per batch; with the photos they "
                             "run as a second forward so the long rows do not pad the question rows")
    parser.add_argument("--val-questions", type=int, default=300,
                        help="questions on the held-out train images used for progress (of 966)")
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--test-questions", type=int, default=1000, help="easy-vqa test questions for the final check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu",
                        help="cpu (default) or cuda (the committed weights were trained on cuda); on cuda the frozen LM runs under bf16 autocast "
                             "and deterministic algorithms are requested (results differ from CPU runs in rounding)")
    parser.add_argument("--no-bf16", action="store_true", help="run the frozen LM in float32 instead of bf16 autocast")
    parser.add_argument("--stage1-weights", default=None,
                        help="cache of the stage-1 result (keyed by the seed, the --align-* options, device, threads and "
                             "a digest of stage 1's data): "
                             "loaded, and stage 1 skipped, when the file exists; written after stage 1 otherwise")
    parser.add_argument("--measure", type=int, default=0, help="only time this many steps, save nothing")
    parser.add_argument("--output", default=None, help="default: the test bed's committed weights file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    rng = random.Random(args.seed)
    bed = dm.testbed(args.testbed)
    output = Path(args.output) if args.output else bed.weights
    log_path = output.with_name("train_vision.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = None if args.measure else open(log_path, "w")

    def log(msg: str):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if log_file:
            log_file.write(line + "\n")
            log_file.flush()

    log(f"args: {vars(args)}  torch {torch.__version__}")
    import easy_vqa
    from PIL import Image

    t0 = time.time()
    model = dm.assemble(vision_weights=None, seed=args.seed, testbed_name=bed).to(device)
    processor = dm.build_processor(testbed_name=bed)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(("model.vision_model.", "model.connector."))
    trainable = [p for p in model.parameters() if p.requires_grad]
    log(f"assembled in {time.time() - t0:.0f}s; trainable params {sum(p.numel() for p in trainable):,}")

    # --- data: easy-vqa train (minus a validation slice of images) + photos -------------------------
    texts, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    ordered_ids = sorted(paths)
    pixels, pixel_masks = pixel_tensors(processor, [Image.open(paths[i]).convert("RGB") for i in ordered_ids])
    row_of = {image_id: row for row, image_id in enumerate(ordered_ids)}
    val_images = set(ordered_ids[-100:])  # the last 100 train images: never trained on
    train_vqa, val_vqa = [], []
    for q, a, i in zip(texts, answers, image_ids):
        ids, start = encode_example(processor, q, a)
        (val_vqa if i in val_images else train_vqa).append(
            {"ids": ids, "answer_start": start, "pixel_index": row_of[i], "type": question_type(a)})
    rng.shuffle(val_vqa)
    val_vqa = val_vqa[: args.val_questions]

    photos = photo_examples()
    refs = sorted({p["image"] for p in photos})
    photo_pixels, photo_masks = pixel_tensors(processor, [load_photo_image(r) for r in refs])
    offset = pixels.shape[0]
    pixels = torch.cat([pixels, photo_pixels])
    pixel_masks = torch.cat([pixel_masks, photo_masks])
    train_photo = []
    for p in photos:
        ids, start = encode_example(processor, p["question"], p["answer"])
        train_photo.append({"ids": ids, "answer_start": start, "pixel_index": offset + refs.index(p["image"])})
    labels = easy_vqa_labels(texts, answers, image_ids)
    train_caption, val_caption = [], []
    for image_id, (color, shape) in labels.items():
        ids, start = encode_example(processor, CAPTION_PROMPT, compose_caption(color, shape, image_id))
        (val_caption if image_id in val_images else train_caption).append(
            {"ids": ids, "answer_start": start, "pixel_index": row_of[image_id], "type": "caption"})
    log(f"data: {len(train_vqa)} easy-vqa train questions, {len(train_caption)} captions; {len(val_vqa)} val "
        f"questions, {len(val_caption)} val captions; {len(train_photo)} photo examples ({len(refs)} photos); "
        f"prepared in {time.time() - t0:.0f}s")

    pad_id = processor.tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_bf16)

    def evaluate(examples, batch_size=32) -> tuple[float, dict[str, float]]:
        """Exact match over ``examples`` and per question type."""
        model.eval()
        hits = []
        with torch.no_grad(), autocast:
            for k in range(0, len(examples), batch_size):
                batch = collate(examples[k : k + batch_size], pixels, pixel_masks, pad_id, device)
                _, h = answer_loss_and_hits(model, batch)
                hits.append(h)
        model.train()
        hits = torch.cat(hits).float().cpu()
        types = [e.get("type", "?") for e in examples]
        per = {t: hits[[k for k, u in enumerate(types) if u == t]].mean().item() for t in sorted(set(types))}
        return hits.mean().item(), per

    def caption_ce(examples, batch_size=16) -> float:
        """Mean (over rows) teacher-forced cross-entropy of held-out captions, nats per token."""
        model.eval()
        losses = []
        with torch.no_grad(), autocast:
            for k in range(0, len(examples), batch_size):
                part = examples[k : k + batch_size]
                loss, _ = answer_loss_and_hits(model, collate(part, pixels, pixel_masks, pad_id, device))
                losses.append(loss.item() * len(part))
        model.train()
        return sum(losses) / max(1, len(examples))

    # --- stage 1: align image tokens with the LM's embeddings of a short description -------------
    # (no LM layers: cheap). easy-vqa: "{color} {shape}" read off the train questions; photos: the
    # answer to their first question. Loss: MSE to the target embeddings, scaled by their mean square.
    align_rows, align_text = [], []
    for image_id, (color, shape) in labels.items():
        if image_id not in val_images:
            align_rows.append(row_of[image_id])
            align_text.append(f"{color} {shape}")
    first_answer = {}
    for p in photos:
        first_answer.setdefault(p["image"], p["answer"])
    for k, ref in enumerate(refs):
        align_rows.append(offset + k)
        align_text.append(first_answer[ref])
    targets_all = description_targets(model, processor.tokenizer, align_text, bed.image_seq_len)
    target_scale = targets_all.pow(2).mean()
    target_ids = description_ids(processor.tokenizer, align_text, bed.image_seq_len).to(device)
    unit_table = torch.nn.functional.normalize(model.model.text_model.embed_tokens.weight.detach().float(), dim=-1)

    def decode_accuracy() -> float:
        """Stage-1 check on the held-out images: nearest LM embedding (cosine) among the 11 color and
        shape words, for the image tokens that should carry the color and the shape."""
        held = [image_id for image_id in sorted(val_images) if image_id in labels]
        words = list(COLORS) + list(SHAPES)
        word_emb = description_targets(model, processor.tokenizer, words, 1)[:, 0]
        word_emb = torch.nn.functional.normalize(word_emb, dim=-1)
        rows = torch.tensor([row_of[i] for i in held])
        with torch.no_grad():
            feats = model.model.get_image_features(pixels[rows].unsqueeze(1).to(device),
                                                   pixel_masks[rows].unsqueeze(1).to(device),
                                                   return_dict=True).pooler_output.float()
        n_color = {c: len(processor.tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in COLORS}
        sims = torch.nn.functional.normalize(feats, dim=-1) @ word_emb.T  # images x tokens x words
        sims = sims.cpu()
        color_hit = [words[sims[k, 0, : len(COLORS)].argmax()] == labels[i][0] for k, i in enumerate(held)]
        shape_hit = [words[len(COLORS) + sims[k, n_color[labels[i][0]], len(COLORS):].argmax()] == labels[i][1]
                     for k, i in enumerate(held)]
        return sum(c and s for c, s in zip(color_hit, shape_hit)) / max(1, len(held))
    def alignment_loss(features: torch.Tensor, pick: torch.Tensor, n_tokens: int | None = None) -> torch.Tensor:
        """Stage-1 loss of image tokens ``features`` (rows ``pick`` of the descriptions), on their first
        ``n_tokens`` tokens (all when None): MSE to the description embeddings, scaled by their mean square,
        plus ``align_ce`` x a decode loss: each image token's nearest LM embedding (cosine, whole vocabulary)
        should be its description token; MSE alone barely separates the three shape words' embeddings."""
        features = features.float()[:, :n_tokens]
        loss = (features - targets_all[pick][:, :n_tokens]).pow(2).mean() / target_scale
        if args.align_ce > 0:
            # the decode loss scores every vocabulary row, so it runs on the first --align-ce-tokens tokens
            # only (v2 has 64 image tokens; all of them would cost 16x v1's stage 1)
            n_ce = min(features.shape[1], args.align_ce_tokens)
            logits = torch.nn.functional.normalize(features[:, :n_ce], dim=-1) @ unit_table.T / args.align_temperature
            loss = loss + args.align_ce * torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), target_ids[pick][:, :n_ce].flatten())
        return loss

    log(f"stage 1: {len(align_rows)} images with descriptions ({len(labels)} easy-vqa labelled)")
    align_opt = torch.optim.AdamW(trainable, lr=args.align_lr, weight_decay=0.01)
    align_steps = 0 if args.measure else args.align_steps
    stage1_cache = Path(args.stage1_weights) if args.stage1_weights else None
    cache_key = stage1_key(args, stage1_data_digest(align_rows, align_text, val_images,
                                                    model.config.vision_config.to_dict()))
    if stage1_cache is not None and stage1_cache.is_file() and not args.measure:
        load_stage1_cache(stage1_cache, model, cache_key)
        log(f"stage 1 loaded from {stage1_cache} (skipped)")
        align_steps = 0
    t1 = time.time()
    for step in range(align_steps):
        pick = torch.tensor(rng.sample(range(len(align_rows)), args.align_batch_size))
        rows = torch.tensor(align_rows)[pick]
        lr = args.align_lr * min(1.0, (step + 1) / 20) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / align_steps)))
        for group in align_opt.param_groups:
            group["lr"] = lr
        features = model.model.get_image_features(
            pixels[rows].unsqueeze(1).to(device), pixel_masks[rows].unsqueeze(1).to(device), return_dict=True
        ).pooler_output
        loss = alignment_loss(features, pick)
        align_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        align_opt.step()
        if step % 25 == 0 or step == align_steps - 1:
            log(f"align step {step + 1}/{align_steps} loss {loss.item():.4f} {(time.time() - t1) / (step + 1):.2f}s/step")
    if align_steps:
        log(f"stage 1 took {(time.time() - t1) / 60:.1f} min; held-out images whose image tokens decode to their "
            f"own color and shape words: {decode_accuracy():.3f}; val exact-match after it "
            f"{evaluate(val_vqa)[0]:.3f} on {len(val_vqa)} held-out train-split questions")

    if stage1_cache is not None and align_steps:
        save_stage1_cache(stage1_cache, dm.vision_state_dict(model), cache_key)
        log(f"stage 1 saved to {stage1_cache}")

    # stage 2 draws from its own seeded generator, so a run that loads the stage-1 cache trains like one
    # that computed stage 1 (bitwise on CPU with the same thread count: a 3-step run gave identical weights)
    rng = random.Random(args.seed + 1)
    torch.manual_seed(args.seed + 1)
    steps = args.measure or args.steps
    n_photo, n_caption, counts = batch_composition(args.batch_size, args.photo_fraction, args.type_mix,
                                                   args.caption_fraction)
    type_names = QUESTION_TYPES
    pools = {t: [k for k, e in enumerate(train_vqa) if e["type"] == t] for t in type_names}
    pools["caption"] = list(range(len(train_caption)))
    for pool in pools.values():
        rng.shuffle(pool)
    cursors = {t: 0 for t in pools}
    # image tokens of the batch (the connector's output), for the stage-1 regulariser
    align_index = {pixel_row: k for k, pixel_row in enumerate(align_rows)}
    captured = {}
    hook = model.model.connector.register_forward_hook(lambda m, a, out: captured.__setitem__("tokens", out))
    model.train()
    start = time.time()
    running = None

    def draw(kind: str, source: list[dict], count: int) -> list[dict]:
        out = []
        pool = pools[kind]
        for _ in range(count):
            if cursors[kind] == len(pool):
                rng.shuffle(pool)
                cursors[kind] = 0
            out.append(source[pool[cursors[kind]]])
            cursors[kind] += 1
        return out

    def part_loss(picked: list[dict]):
        """Answer loss (+ the stage-1 regulariser) of one sub-batch, and its exact-match hits."""
        with autocast:
            loss, hits = answer_loss_and_hits(model, collate(picked, pixels, pixel_masks, pad_id, device))
        if args.stage2_align > 0:
            rows_in_align = [align_index.get(e["pixel_index"], -1) for e in picked]
            keep = torch.tensor([r >= 0 for r in rows_in_align], device=device)
            if keep.any():
                pick = torch.tensor([r for r in rows_in_align if r >= 0])
                reg = alignment_loss(captured.pop("tokens")[keep], pick, args.stage2_align_tokens)
                loss = loss + args.stage2_align * reg
        return loss, hits

    for step in range(steps):
        questions = [row for t, count in zip(type_names, counts) for row in draw(t, train_vqa, count)]
        # long rows (captions, photos) run as their own forward: padding them with the question rows
        # would cost a caption's length on every row
        long_rows = draw("caption", train_caption, n_caption) + rng.sample(train_photo, n_photo)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss, hits = part_loss(questions)
        if long_rows:
            long_loss, _ = part_loss(long_rows)
            total = len(questions) + len(long_rows)
            loss = (len(questions) * loss + len(long_rows) * long_loss) / total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if args.measure or step % 2 == 0 or step == steps - 1:
            elapsed = time.time() - start
            log(f"step {step + 1}/{steps} loss {loss.item():.3f} (ema {running:.3f}) batch-acc {hits.float().mean():.2f} "
                f"lr {lr_at(step):.2e} {elapsed / (step + 1):.2f}s/step")
        if not args.measure and ((step + 1) % args.val_every == 0 or step == steps - 1):
            acc, per = evaluate(val_vqa)
            per_s = ", ".join(f"{t} {v:.2f}" for t, v in per.items())
            log(f"step {step + 1}: val exact-match {acc:.3f} ({per_s}) on {len(val_vqa)} held-out train-split questions; "
                f"val caption CE {caption_ce(val_caption):.3f} nats/token on {len(val_caption)} held-out captions")
    hook.remove()
    if args.measure:
        log(f"measured {(time.time() - start) / steps:.2f}s/step at batch {args.batch_size}")
        return 0

    from safetensors.torch import save_file

    state = {k: v.float().cpu().contiguous() for k, v in dm.vision_state_dict(model).items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(output), metadata={"train_args": json.dumps(vars(args))})
    log(f"saved {len(state)} tensors ({output.stat().st_size / 2**20:.1f} MiB) to {output}; "
        f"training took {(time.time() - start) / 60:.1f} min")

    if args.test_questions <= 0:
        return 0
    # quick check on the easy-vqa TEST split (teacher-forced greedy exact match, same bf16 autocast)
    t_texts, t_answers, t_image_ids = easy_vqa.get_test_questions()
    t_paths = easy_vqa.get_test_image_paths()
    pick = random.Random(1234).sample(range(len(t_texts)), min(args.test_questions, len(t_texts)))
    used = sorted({t_image_ids[k] for k in pick})
    test_pixels, test_masks = pixel_tensors(processor, [Image.open(t_paths[i]).convert("RGB") for i in used])
    pixels, pixel_masks = test_pixels, test_masks
    test_examples = []
    for k in pick:
        ids, st = encode_example(processor, t_texts[k], t_answers[k])
        test_examples.append({"ids": ids, "answer_start": st, "pixel_index": used.index(t_image_ids[k]),
                              "type": question_type(t_answers[k])})
    acc, per = evaluate(test_examples)
    log(f"easy-vqa TEST exact-match (teacher-forced greedy, {'float32' if args.no_bf16 else 'bf16 autocast'}): {acc:.3f} "
        f"({', '.join(f'{t} {v:.3f}' for t, v in per.items())}) on {len(test_examples)} questions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
