"""Answer-only token log-likelihood for LLaVA-family vision-language models (`LlavaLikelihood`).

    logp(y | image, x) = Σ_t mask_t · log softmax(logits_{t-1})[y_t]        (METHODS.md §2)

over the answer tokens only: prompt, image tokens and padding contribute nothing. This is
`CausalLMLikelihood` (answer tokenisation, truncation rules, `selective_log_softmax`) with a
processor in front.

Records (TRL's VLM preference format)::

    {"images": [img, ...] | "image": img, "videos": [video, ...] | "video": video,
     "prompt": str | [messages], "chosen", "rejected"}

A video is a folder of frames, a list of frames or a file (`mmalign.data.media.load_video`); its
frames go to the processor, which samples them per its settings, with their frame rate (a file's
own; frames: the record's `video_fps`, default 2), which sets the temporal positions (Qwen2.5-VL's
second_per_grid_ts, Qwen3-VL's timestamps); families whose processor has no video token refuse
video records. Video placeholders follow the image rules below.

An image is a path (relative to the data file's folder), bytes, {"bytes", "path"} or a PIL
image. A prompt holding `<image>` placeholders keeps them (one per image, in order);
otherwise one placeholder per image is put at the start of the user turn. The processor's
(or tokenizer's) chat template wraps the prompt when it has one (`chat_template=None`),
else the plain prompt is used.

Batches: each record goes through the processor ONCE (prompt + its images); its outputs
are then reused by every item of the record (chosen and rejected). Tensors with one row per
image (`pixel_values`, `image_sizes`, `image_grid_thw`, anything else the processor returns)
are concatenated in item order -- all images of item 0, then item 1, ... (2B items: chosen
items first) -- padded with zeros where per-image shapes differ (LLaVA-NeXT patch counts);
per-token tensors (`token_type_ids`, ...) are extended over the answer. Rows are right-padded,
so no position ids are needed (Qwen2-VL's 3-D rope positions stay the model's business).

Prompts are never truncated, image tokens never cut: a prompt (with expanded image tokens)
leaving no room for one answer token within `max_length` is a `DataError` naming the example.
For LLaVA the count of image tokens is checked against the features the vision tower will
produce, before any forward pass.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mmalign.data.media import load_image, load_video_clip, record_images, record_videos
from mmalign.data.preference import batch_fields, flatten
from mmalign.errors import ConfigError, DataError
from mmalign.layout import batch_slots
from mmalign.modalities.causal_lm import CausalLMLikelihood, log_square_mass, selective_log_softmax
from mmalign.modalities.fast_paths import paths_agree, verified_once
from mmalign.modalities.lm_head import captured_hidden, chunked_token_logps, language_model, logit_transform
from mmalign.modalities.packing import Packed, pack_inputs
from mmalign.tensors import right_pad_cat
from mmalign.types import Draw, LogpOutput, PreferenceBatch

# Submodules that belong to the vision side (towers, projectors) across LLaVA-like families.
VISION_PARTS = ("vision_tower", "multi_modal_projector", "vision_model", "visual", "image_newline",
                "mm_projector", "vision_resampler")
TEXT_KEYS = ("input_ids", "attention_mask")


def _text_of(content: Any) -> str:
    """The text of a message content: a string, or the text entries of a typed list."""
    if isinstance(content, str):
        return content
    return "".join(c.get("text", "") for c in content if c.get("type") == "text")


class LlavaLikelihood(CausalLMLikelihood):
    """Scores answers under a LLaVA-family model (LLaVA, LLaVA-NeXT, and other image-text-to-text
    models whose processor expands image placeholders in the text).

    processor: the model's transformers processor (tokenizer + image processor).
    config: the model config (its `image_token_id` and vision settings), for the token check.
    max_length, max_prompt_length: as `CausalLMLikelihood`; counts include image tokens.
    chat_template: None uses the processor's (or tokenizer's) template when there is one;
        True requires one; False uses the plain prompt.
    roots: folders that relative image paths are resolved against, first match wins.
    lm_head_chunk: answer tokens per LM-head chunk (`model.lm_head_chunk`; 0: full logits).
    padding_free: run each batch as one packed row (`data.padding_free`, `packing.pack_inputs`),
        once checked per model to give the padded log-probs (else padded, with a warning); M-RoPE
        language models (Qwen2/2.5/3-VL) always use padded batches.
    """

    deterministic = True  # no randomness: a precomputed reference is exact

    def __init__(self, processor: Any, config: Any = None, max_length: int = 2048, max_prompt_length: int = 0,
                 chat_template: bool | None = None, roots: Sequence[str | Path] = (), lm_head_chunk: int = 0,
                 padding_free: bool = False) -> None:
        tokenizer = getattr(processor, "tokenizer", processor)
        super().__init__(tokenizer, max_length, max_prompt_length, chat_template=bool(chat_template),
                         lm_head_chunk=lm_head_chunk, padding_free=padding_free)
        self.pack_ok: dict[int, bool] = {}  # id(language model) -> packed forward == padded (checked once)
        self.processor, self.config = processor, config
        self.use_template = chat_template
        self.roots = [Path(r) for r in roots]
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        token_id = getattr(config, "image_token_id", None)
        self.image_token_id = token_id if token_id is not None else tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token = getattr(processor, "video_token", None)  # None: the family takes no video
        self._keep_ok: dict[type, bool] = {}
        self.image_overhead: int | None = None  # record_length: tokens per image beyond the processor's count

    # -- prompt text --------------------------------------------------------------
    def _template_owner(self) -> Any:
        """The object whose chat template wraps prompts, or None for plain prompts."""
        if self.use_template is False:
            return None
        for owner in (self.processor, self.tokenizer):
            if getattr(owner, "chat_template", None):
                return owner
        if self.use_template:
            raise DataError("data.chat_template is on but neither the processor nor the tokenizer has a chat template")
        return None

    def _messages(self, prompt: Any, counts: dict[str, int], where: str) -> list[dict[str, Any]]:
        """User messages with one entry per image and per video (`counts`: {"image": n,
        "video": m}): placeholders already in the text are kept; otherwise the videos' then the
        images' entries open the first user turn."""
        messages = copy.deepcopy(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        for m in messages:  # typed content everywhere: chat templates iterate over it
            if isinstance(m["content"], str):
                m["content"] = [{"type": "text", "text": m["content"]}]
        user = next((m for m in messages if m["role"] == "user"), messages[0])
        for kind in ("image", "video"):
            token, n = self._placeholder(kind), counts[kind]
            present = sum(_text_of(m["content"]).count(token) for m in messages) if token else 0
            present += sum(c.get("type") == kind for m in messages for c in m["content"])
            if present == 0 and n:
                user["content"] = [{"type": kind}] * n + user["content"]
            elif present != n:
                raise DataError(f"{where}: the prompt has {present} {kind} placeholders for {n} {kind}s")
        return messages

    def _placeholder(self, kind: str) -> str | None:
        return self.image_token if kind == "image" else self.video_token

    def prompt_text(self, record: dict[str, Any], n_images: int, where: str, n_videos: int = 0) -> str:
        """The prompt as the model reads it, with exactly one `image_token` per image (and one
        `video_token` per video)."""
        if n_videos and not self.video_token:
            raise DataError(f"{where}: the record has videos but this model's processor takes none")
        counts = {"image": n_images, "video": n_videos}
        messages = self._messages(record["prompt"], counts, where)
        owner = self._template_owner()
        if owner is self.processor:
            text = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:  # plain text (or a text-only tokenizer template): placeholders become tokens
            for m in messages:
                m["content"] = "".join(self._placeholder(c["type"]) + "\n" if c.get("type") in counts
                                       else c.get("text", "") for c in m["content"])
            text = (owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) if owner
                    else "\n".join(m["content"] for m in messages))
        for kind, n in counts.items():
            token = self._placeholder(kind)
            if (n or token) and text.count(token) != n:
                raise DataError(f"{where}: the prompt text holds {text.count(token)} '{token}' "
                                f"placeholders for {n} {kind}s")
        return text

    # -- one record through the processor --------------------------------------------
    def _image(self, value: Any, where: str, root: str | None = None) -> Any:
        """`root`: the record's own data folder (`_root`, set by the trainer), else the data folders."""
        return load_image(value, where, root or self.roots)

    def read_image(self, value: Any, where: str, root: str | None = None) -> Any:
        """One image value as `collate` reads it (mmalign.types.ScoresModifiedImages)."""
        return self._image(value, where, root)

    def encode_prompt(self, record: dict[str, Any]) -> dict[str, Tensor]:
        """Processor outputs for one record's prompt and images, each with a leading dim of 1
        (text keys: (1, P)) or of the record's image count (pixel_values: (n_images, ...))."""
        where = f"example {record.get('_index', '?')}"
        images = [self._image(v, f"{where}, image {j}", record.get("_root"))
                  for j, v in enumerate(record_images(record))]
        clips = [load_video_clip(v, f"{where}, video {j}", record.get("_root") or self.roots, record.get("video_fps"))
                 for j, v in enumerate(record_videos(record))]
        videos = [frames for frames, _ in clips]
        text = self.prompt_text(record, len(images), where, len(videos))
        bos = self.tokenizer.bos_token
        special = not (bos and text.startswith(bos))  # a template that writes BOS itself
        media = {"images": images or None}
        if videos:  # the frame rate sets the videos' temporal positions (Qwen2.5-VL, Qwen3-VL)
            media |= {"videos": videos, "video_metadata": [{"total_num_frames": len(f), "fps": fps} for f, fps in clips]}
        out = self.processor(text=[text], **media, return_tensors="pt", add_special_tokens=special)
        out = {k: v for k, v in out.items() if v is not None}
        n_prompt = out["input_ids"].shape[1]
        if self.max_prompt_length and n_prompt > self.max_prompt_length:
            raise DataError(f"{where}: prompt has {n_prompt} tokens (image tokens included) > "
                            f"data.max_prompt_length={self.max_prompt_length}")
        if n_prompt >= self.max_length:
            raise DataError(f"{where}: prompt has {n_prompt} tokens (image tokens included), leaving no room for "
                            f"the answer within data.max_length={self.max_length}; prompts and images are never cut")
        self.check_image_tokens(out, len(images), where)
        return out

    def expected_image_tokens(self, out: dict[str, Tensor], n_images: int) -> int | None:
        """Image features the model will produce for these processor outputs, where it can be
        known without a forward pass (LLaVA with a CLIP/SigLIP tower); None otherwise."""
        c = self.config
        if c is None or getattr(c, "model_type", "") != "llava" or "pixel_values" not in out or n_images == 0:
            return None
        tower = getattr(c.vision_config, "model_type", "")
        if tower not in ("clip_vision_model", "siglip_vision_model"):
            return None
        h, w = out["pixel_values"].shape[-2:]
        p = c.vision_config.patch_size
        per_image = (h // p) * (w // p) + (tower == "clip_vision_model") - (c.vision_feature_select_strategy == "default")
        return per_image * n_images

    def check_image_tokens(self, out: dict[str, Tensor], n_images: int, where: str) -> None:
        """Raise a DataError when the expanded image tokens cannot match the image features."""
        found = int((out["input_ids"] == self.image_token_id).sum())
        expected = self.expected_image_tokens(out, n_images)
        if n_images and found == 0:
            raise DataError(f"{where}: the processor wrote no image token (id {self.image_token_id}) for {n_images} "
                            "images: processor and model disagree on the image token")
        if expected is not None and found != expected:
            raise DataError(
                f"{where}: {found} image tokens in the prompt but the model will produce {expected} image features "
                f"for {n_images} image(s) (\"Image features and image tokens do not match\"); check the processor's "
                "patch_size, num_additional_image_tokens (1 for a CLIP tower) and vision_feature_select_strategy "
                "against the model config")

    # -- batches ----------------------------------------------------------------------
    def _response_ids(self, response: Any) -> list[int]:
        if isinstance(response, list):  # [{"role": "assistant", "content": str | [{"type": "text", ...}]}]
            response = "".join(_text_of(m["content"]) for m in response)
        return super()._response_ids(response)

    def collate(self, records: list[dict[str, Any]], kind: str) -> PreferenceBatch:
        """records -> batch of N items (2B for pairs: chosen rows first), right-padded.

        inputs: input_ids, attention_mask, loss_mask (1 on answer tokens) (N, T); every other
        processor output: per-image tensors concatenated in item order (e.g. pixel_values
        (Σ images, 3, H, W)), per-token tensors (N, T).
        """
        prompts = [self.encode_prompt(r) for r in records]
        owners = [i for i, _ in batch_slots(records, kind)]
        items = flatten(records, kind)
        rows = []
        for item, owner in zip(items, owners, strict=True):
            prompt = prompts[owner]["input_ids"][0].tolist()
            rows.append((prompt + self._response_ids(item["response"])[: self.max_length - len(prompt)], len(prompt)))
        n, width = len(rows), max(len(ids) for ids, _ in rows)
        inputs = {"input_ids": torch.full((n, width), self.tokenizer.pad_token_id, dtype=torch.long),
                  "attention_mask": torch.zeros((n, width), dtype=torch.long),
                  "loss_mask": torch.zeros((n, width), dtype=torch.long)}
        for row, (ids, n_prompt) in enumerate(rows):
            inputs["input_ids"][row, : len(ids)] = torch.tensor(ids)
            inputs["attention_mask"][row, : len(ids)] = 1
            inputs["loss_mask"][row, n_prompt : len(ids)] = 1
        inputs.update(self._extra_inputs(prompts, owners, width))
        return batch_fields(records, kind, inputs)

    def record_length(self, record: dict[str, Any], kind: str) -> int:
        """Tokens of the record's longest row, image tokens included where the processor can count
        them from the image sizes (mmalign.types.MeasuresLength, `lengths.vlm_record_length`)."""
        from mmalign.modalities.lengths import vlm_record_length

        return vlm_record_length(self, record, kind)

    @staticmethod
    def _extra_inputs(prompts: list[dict[str, Tensor]], owners: list[int], width: int) -> dict[str, Tensor]:
        """Every non-text processor output, laid out for the N items (see `collate`)."""
        extra: dict[str, Tensor] = {}
        keys = dict.fromkeys(k for p in prompts for k in p if k not in TEXT_KEYS)
        for key in keys:
            parts = [(prompts[o][key], prompts[o]["input_ids"].shape) for o in owners if key in prompts[o]]
            if all(t.shape == shape for t, shape in parts) and len(parts) == len(owners):  # per token
                block = torch.zeros((len(owners), width), dtype=parts[0][0].dtype)
                for row, (t, _) in enumerate(parts):
                    block[row, : t.shape[1]] = t[0]
                extra[key] = block
            else:  # per image (or per record): item order
                extra[key] = right_pad_cat([t for t, _ in parts])
        return extra

    # -- the contract (draw: the parent's empty Draw) -----------------------------------------
    def _accepts_logits_to_keep(self, model: torch.nn.Module) -> bool:
        base = getattr(model, "module", model)  # DDP
        base = base.get_base_model() if hasattr(base, "get_base_model") else base  # peft
        if type(base) not in self._keep_ok:
            self._keep_ok[type(base)] = "logits_to_keep" in inspect.signature(base.forward).parameters
        return self._keep_ok[type(base)]

    def logps(self, model: torch.nn.Module, batch: PreferenceBatch, draw: Draw | None = None) -> LogpOutput:
        """Sum of answer-token log-probs per item: logps (N,), tokens (N,), token_logps and
        token_mask (N, K): the last K = T - s - 1 positions, s + 1 the first answer position
        of any row (logits are only computed from position s on). With `lm_head_chunk` > 0 the
        answer tokens go through the head in chunks (`lm_head.chunked_token_logps`), once checked
        on the model's first batch to give the full path's log-probs."""
        x = batch.inputs
        loss_mask = x["loss_mask"]
        width = loss_mask.shape[1]
        start = max(int(loss_mask.argmax(-1).min()) - 1, 0)  # first position whose logits are needed
        kwargs = {k: v for k, v in x.items() if k != "loss_mask"}
        if self._accepts_logits_to_keep(model):
            kwargs["logits_to_keep"] = width - start
        labels = x["input_ids"][:, start + 1:]
        mask = loss_mask[:, start + 1:].to(torch.float32)
        chunked = self.lm_head_chunk > 0 and self._chunk_checked(model, batch, kwargs, width - start, labels, mask)
        packed = None
        if self.padding_free and self._pack_checked(model, batch, kwargs, width - start, labels, mask):
            kwargs, packed = pack_inputs(kwargs)
        token_logps, square = self._token_logps(model, batch, kwargs, width - start, labels, mask, chunked, packed)
        return LogpOutput(logps=token_logps.sum(-1), tokens=mask.sum(-1), token_logps=token_logps, token_mask=mask,
                          token_log_sq_mass=square)

    def _token_logps(self, model: torch.nn.Module, batch: PreferenceBatch, kwargs: dict[str, Any], keep: int,
                     labels: Tensor, mask: Tensor, chunked: bool,
                     packed: Packed | None = None) -> tuple[Tensor, Tensor | None]:
        """(token_logps, log square mass or None) of the last `keep` positions, chunked or full;
        `packed`: kwargs are one packed row (`pack_inputs`), outputs go back to the padded layout."""
        unpack = (lambda v: v) if packed is None else packed.unpack
        try:
            if chunked:
                with captured_hidden(model) as (capture, head):
                    model(**kwargs, use_cache=False)
                hidden = unpack(capture.hidden)[:, -keep:]
                return chunked_token_logps(hidden[:, :-1], head, labels, mask, self.lm_head_chunk, self.transform,
                                           self.square_mass)
            logits = unpack(model(**kwargs, use_cache=False).logits)[:, -keep:]
        except ValueError as e:
            if "do not match" not in str(e):
                raise
            raise DataError(f"examples {batch.index.tolist()}: {e}; check the processor against the model "
                            "config (patch_size, num_additional_image_tokens, vision_feature_select_strategy)") from e
        token_logps = selective_log_softmax(logits[:, :-1], labels) * mask
        return token_logps, (log_square_mass(logits[:, :-1]) * mask if self.square_mass else None)

    def _chunk_checked(self, model: torch.nn.Module, batch: PreferenceBatch, kwargs: dict[str, Any], keep: int,
                       labels: Tensor, mask: Tensor) -> bool:
        """Whether the chunked head gives `model`'s full-logits log-probs, checked once per model on
        its first batch (`fast_paths`); a model whose logits go through a transform
        `LogitTransform` does not know uses the full logits, with a warning."""
        def verify() -> tuple[bool, bool]:
            self.transform = logit_transform(language_model(model).config)
            ok = paths_agree(model, lambda: self._token_logps(model, batch, kwargs, keep, labels, mask, False)[0],
                             lambda: self._token_logps(model, batch, kwargs, keep, labels, mask, True)[0],
                             mask.bool(), 1e-4,
                             f"model.lm_head_chunk: {type(language_model(model)).__name__} transforms its logits in "
                             "a way mmalign does not know; log-probs use the full logits")
            return False, ok

        return verified_once(self.checked, id(language_model(model)), verify)[1]

    def _pack_checked(self, model: torch.nn.Module, batch: PreferenceBatch, kwargs: dict[str, Any], keep: int,
                      labels: Tensor, mask: Tensor) -> bool:
        """Whether one packed row (`pack_inputs`) gives `model`'s padded log-probs, checked once per
        model on its first whole batch (images cannot be cut); otherwise padded batches, with a warning."""
        def verify() -> bool:
            name = type(language_model(model)).__name__
            if multimodal_rope(language_model(model).config):
                warnings.warn(f"data.padding_free: {name} computes 3-D M-RoPE positions from each sequence's "
                              "image grid, which one packed row cannot give; using padded batches")
                return False
            packed_kwargs, packed = pack_inputs(kwargs)
            return paths_agree(
                model, lambda: self._token_logps(model, batch, kwargs, keep, labels, mask, False)[0],
                lambda: self._token_logps(model, batch, packed_kwargs, keep, labels, mask, False, packed)[0],
                mask.bool(), 1e-4,
                f"data.padding_free: {name} does not give its padded log-probs on one packed row; "
                "using padded batches")

        return verified_once(self.pack_ok, id(language_model(model)), verify)


def multimodal_rope(config: Any) -> bool:
    """Whether the language model rotates by multimodal positions (Qwen2-VL's M-RoPE: `mrope_section`
    in its rope parameters): (3, T) positions the model derives from the images' grids, not the
    1-D restarting positions of a packed row."""
    text = config.get_text_config()
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    return isinstance(rope, dict) and "mrope_section" in rope


# -- LoRA on the language model only ---------------------------------------------------------
def is_vision_module(name: str, parts: Sequence[str] = VISION_PARTS) -> bool:
    """True for modules of the vision tower or the projector (any path component in `parts`, the
    family's vision-side submodule names; default: those of the LLaVA-like families)."""
    return any(part in parts for part in name.split("."))


def language_model_targets(model: torch.nn.Module, target_modules: Sequence[str],
                           parts: Sequence[str] = VISION_PARTS) -> list[str]:
    """Full names of the linear layers that LoRA should wrap: every module whose last name
    component is one of the bare names in `target_modules` (e.g. q_proj, v_proj) and that is
    NOT in the vision tower or the projector (`parts`). Dotted entries (an explicit module path
    such as "multi_modal_projector.linear_1") are kept as given. peft matches full names exactly."""
    bare = {t for t in target_modules if "." not in t}
    dotted = [t for t in target_modules if "." in t]
    names = [name for name, module in model.named_modules()
             if name.split(".")[-1] in bare and not is_vision_module(name, parts)
             and isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d))]
    if bare and not names:
        raise ConfigError(f"lora.target_modules {sorted(bare)}: no such layer in the language model")
    return names + dotted


def restrict_lora_to_language_model(model: torch.nn.Module, lora: Any, parts: Sequence[str] = VISION_PARTS) -> None:
    """Rewrite `lora.target_modules` in place to language-model-only full names (see
    `language_model_targets`): short names like q_proj also exist in the vision tower."""
    before = list(lora.target_modules)
    lora.target_modules = language_model_targets(model, before, parts)
    if lora.target_modules != before and os.environ.get("RANK", "0") == "0":  # once, not per process
        print(f"[mmalign] lora.target_modules {before} restricted to the language model: "
              f"{len(lora.target_modules)} modules (vision tower and projector excluded)")


def check_model_type(path: Any, model_types: Sequence[str], modality: str, remote: bool) -> None:
    """ConfigError when the folder's `config.json` model_type is not one the family loads."""
    from transformers import AutoConfig

    if not model_types:  # the generic `llava` family loads any image-text-to-text model
        return
    found = AutoConfig.from_pretrained(path, trust_remote_code=remote).model_type
    if found not in model_types:
        raise ConfigError(f"model.path: {path} holds a '{found}' model; modality '{modality}' loads "
                          f"{' / '.join(model_types)} (pick the modality of that family)")


def build(cfg: Any, parts: Sequence[str] = VISION_PARTS,
          model_types: Sequence[str] = ()) -> tuple[torch.nn.Module, LlavaLikelihood, Any]:
    """Load an image-text-to-text model and its processor from the local directory
    `cfg.model.path` (its model_type one of `model_types` when given); with LoRA on, restrict
    `cfg.lora.target_modules` to the language model (vision-side submodules: `parts`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.config import resolve_path
    from mmalign.modalities.diffusion import data_roots

    path, remote = resolve_path(cfg.model.path), cfg.model.trust_remote_code
    check_model_type(path, model_types, cfg.modality, remote)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, cfg.model.dtype),
                                                        trust_remote_code=remote)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=remote)
    if cfg.lora.enabled:
        restrict_lora_to_language_model(model, cfg.lora, parts)
    likelihood = LlavaLikelihood(processor, model.config, cfg.data.max_length, cfg.data.max_prompt_length,
                                 True if cfg.data.chat_template else None, data_roots(cfg), cfg.model.lm_head_chunk,
                                 cfg.data.padding_free)
    return model, likelihood, processor
