"""Tiny random VLMs of the current families, built offline from their real transformers config,
model and processor classes (no downloads): a word-level tokenizer (mmalign.toytext) holding each
family's special tokens, the family's real image processor at 32x32 pixels, a 2-layer vision
tower and a 2-layer language model, and a small Jinja chat template with the family's layout and
image placeholder. `save_family(name, path)` writes model + processor for `from_pretrained`.

Image tokens per 32x32 image: Qwen2.5-VL / Qwen3-VL 4 (16 patches of 8 px, 2x2 merge), Gemma 3 4
soft tokens (4x4 SigLIP patches pooled to 2x2) between <start_of_image>/<end_of_image>, Idefics3 /
SmolVLM 4 (scale factor 2) wrapped in <fake_token_around_image><global-img>, LLaVA-OneVision 16
base + anyres tile + newline tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from mmalign.toytext import build_word_tokenizer
from mmalign.toyvlm import VLM_WORDS

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3)
WORDS = [*VLM_WORDS, "user", "assistant", "model", "User", "Assistant", "video"]


def _video_only_num2words(number: int) -> str:
    raise RuntimeError("num2words is not installed: SmolVLM's video prompts need it (pip install num2words)")


def allow_smolvlm_without_num2words() -> None:
    """SmolVLMProcessor refuses to construct without the `num2words` package, which it calls only
    to write video prompts ("You are provided the following series of {three} frames"): for the
    image tests, stand in a function that raises if a video prompt ever asks for it."""
    import importlib.util

    from transformers.models.smolvlm import processing_smolvlm

    if importlib.util.find_spec("num2words") is None and processing_smolvlm.num2words is None:
        processing_smolvlm.num2words = _video_only_num2words


def _content(image: str, video: str) -> str:
    """Jinja for one message's content: `image` / `video` for each image / video entry, the
    text entries as is."""
    return ("{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'video' %}" + video +
            "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}")


def _template(turn: str, end: str, image: str, generation: str, bos: str = "", video: str = "") -> str:
    """A chat template: `bos`, then per message `turn` (with {role}) + content + `end`."""
    head = turn.replace("{role}", "{{ m['role'] }}")
    return (bos + "{% for m in messages %}" + head + _content(image, video) + end + "{% endfor %}"
            "{% if add_generation_prompt %}" + generation + "{% endif %}")


def _tokenizer(specials: list[str], **extra: str) -> Any:
    tok = build_word_tokenizer(WORDS)
    tok.add_tokens(specials, special_tokens=True)
    if extra:  # named multimodal tokens (tokenizer.boi_token, ...), saved in tokenizer_config.json
        tok._set_model_specific_special_tokens(special_tokens=extra)
    tok.model_max_length = 512
    return tok


def _seeded(cls: Any, config: Any, seed: int) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).eval()


QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = _template("<|im_start|>{role}\n", "<|im_end|>\n", "<|vision_start|><|image_pad|><|vision_end|>",
                          "<|im_start|>assistant\n", video="<|vision_start|><|video_pad|><|vision_end|>")


def _qwen_ids(tok: Any) -> dict[str, int]:
    ids = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    return dict(zip(("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"), ids))


def build_qwen(version: str, seed: int = 0) -> tuple[Any, Any]:
    """Qwen2.5-VL (`version="2.5"`) or Qwen3-VL ("3"): patch 8, 2x2 merge, M-RoPE 2+3+3."""
    import transformers as tf

    tok = _tokenizer(QWEN_SPECIALS)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64)
    if version == "2.5":
        config = tf.Qwen2_5_VLConfig(text_config=dict(TEXT, vocab_size=len(tok), rope_parameters=rope),
                                     vision_config=dict(vision, window_size=16, fullatt_block_indexes=[1]),
                                     **_qwen_ids(tok))
        model, processor_cls, video_cls = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor, \
            tf.Qwen2VLVideoProcessor
    else:
        config = tf.Qwen3VLConfig(text_config=dict(TEXT, vocab_size=len(tok), head_dim=16,
                                                   rope_parameters=dict(rope, mrope_interleaved=True)),
                                  vision_config=dict(vision, num_position_embeddings=16, deepstack_visual_indexes=[0]),
                                  **_qwen_ids(tok))
        model, processor_cls, video_cls = tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor, \
            tf.Qwen3VLVideoProcessor
    sizes = dict(patch_size=8, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 32 * 32,
                                                                           "longest_edge": 64 * 64})
    processor = processor_cls(image_processor=tf.Qwen2VLImageProcessor(**sizes), video_processor=video_cls(**sizes),
                              tokenizer=tok, chat_template=QWEN_TEMPLATE)
    return _seeded(model, config, seed), processor


GEMMA_SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
GEMMA_TEMPLATE = _template("<start_of_turn>{role}\n", "<end_of_turn>\n", "<start_of_image>",
                           "<start_of_turn>model\n", bos="{{ bos_token }}")


def build_gemma3(seed: int = 0) -> tuple[Any, Any]:
    """Gemma 3: SigLIP 32 px / patch 8 (16 patches) pooled to 4 soft tokens; Gemma3 text."""
    import transformers as tf

    tok = _tokenizer(GEMMA_SPECIALS, boi_token="<start_of_image>", eoi_token="<end_of_image>",
                     image_token="<image_soft_token>")
    boi, eoi, image = tok.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
    text = dict(TEXT, vocab_size=len(tok), head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=boi,
                             eoi_token_index=eoi, image_token_index=image)
    images = tf.Gemma3ImageProcessor(size={"height": 32, "width": 32})
    processor = tf.Gemma3Processor(image_processor=images, tokenizer=tok, chat_template=GEMMA_TEMPLATE,
                                   image_seq_length=4)
    model = _seeded(tf.Gemma3ForConditionalGeneration, config, seed)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # its init is zeros: every image would look alike
        torch.manual_seed(seed)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.1)
    return model, processor


IDEFICS_SPECIALS = ["<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]
IDEFICS_TEMPLATE = _template("<|im_start|>{role}:", "<end_of_utterance>\n", "<image>", "<|im_start|>Assistant:")


def build_idefics3(smol: bool = False, seed: int = 0) -> tuple[Any, Any]:
    """Idefics3 (or SmolVLM with `smol=True`): 32 px / patch 8, pixel shuffle 2 -> 4 tokens per
    image, no image splitting; Llama text."""
    import transformers as tf

    tok = _tokenizer(IDEFICS_SPECIALS)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    kwargs = dict(text_config=tf.LlamaConfig(**TEXT, vocab_size=len(tok)), vision_config=vision, scale_factor=2,
                  image_token_id=tok.convert_tokens_to_ids("<image>"))
    sizes = dict(size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False)
    if smol:
        allow_smolvlm_without_num2words()
        config, model = tf.SmolVLMConfig(**kwargs), tf.SmolVLMForConditionalGeneration
        processor = tf.SmolVLMProcessor(image_processor=tf.SmolVLMImageProcessor(**sizes), tokenizer=tok,
                                        video_processor=tf.SmolVLMVideoProcessor(**sizes), image_seq_len=4,
                                        chat_template=IDEFICS_TEMPLATE)
    else:
        config, model = tf.Idefics3Config(**kwargs), tf.Idefics3ForConditionalGeneration
        processor = tf.Idefics3Processor(image_processor=tf.Idefics3ImageProcessor(**sizes), tokenizer=tok,
                                         image_seq_len=4, chat_template=IDEFICS_TEMPLATE)
    return _seeded(model, config, seed), processor


ONEVISION_SPECIALS = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]
ONEVISION_TEMPLATE = _template("<|im_start|>{role}\n", "<|im_end|>\n", "<image>\n", "<|im_start|>assistant\n",
                               video="<video>\n")


def build_onevision(seed: int = 0) -> tuple[Any, Any]:
    """LLaVA-OneVision: SigLIP 32 px / patch 8 (16 tokens per tile, all kept), anyres grid of
    32/64 px tiles with a newline token per row; Qwen2 text."""
    import transformers as tf

    tok = _tokenizer(ONEVISION_SPECIALS)
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8)
    config = tf.LlavaOnevisionConfig(
        vision_config=vision, text_config=tf.Qwen2Config(**TEXT, vocab_size=len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints)
    sizes = dict(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    processor = tf.LlavaOnevisionProcessor(
        image_processor=tf.LlavaOnevisionImageProcessor(**sizes),
        video_processor=tf.LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
        num_image_tokens=16, vision_feature_select_strategy="full", chat_template=ONEVISION_TEMPLATE)
    return _seeded(tf.LlavaOnevisionForConditionalGeneration, config, seed), processor


def build_llava(next_style: bool = False) -> tuple[Any, Any]:
    """The toy LLaVA-1.5 (or LLaVA-NeXT) of mmalign.toyvlm: CLIP tower, Llama, 16 tokens per image."""
    from mmalign.toyvlm import build_tiny_llava, build_tiny_llava_processor, build_vlm_tokenizer

    tok = build_vlm_tokenizer()
    return build_tiny_llava(tok, next_style=next_style), build_tiny_llava_processor(tok, next_style=next_style)


BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "llava": build_llava,
    "llava_next": lambda: build_llava(next_style=True),
    "qwen2_5_vl": lambda: build_qwen("2.5"),
    "qwen3_vl": lambda: build_qwen("3"),
    "gemma3": build_gemma3,
    "idefics3": build_idefics3,
    "smolvlm": lambda: build_idefics3(smol=True),
    "llava_onevision": build_onevision,
}


# The prompt each family's template writes: (head, per-image placeholder, tail) around "describe the image ."
QWEN = ("<|im_start|>user\n", "<|vision_start|><|image_pad|><|vision_end|>", "<|im_end|>\n<|im_start|>assistant\n")
IDEFICS = ("<|im_start|>user:", "<image>", "<end_of_utterance>\n<|im_start|>Assistant:")
TEMPLATES = {"qwen2_5_vl": QWEN, "qwen3_vl": QWEN, "idefics3": IDEFICS, "smolvlm": IDEFICS,
             "gemma3": ("<bos><start_of_turn>user\n", "<start_of_image>", "<end_of_turn>\n<start_of_turn>model\n"),
             "llava_onevision": ("<|im_start|>user\n", "<image>\n", "<|im_end|>\n<|im_start|>assistant\n"),
             "llava": ("USER : ", "<image> ", " ASSISTANT :"), "llava_next": ("USER : ", "<image> ", " ASSISTANT :")}


def prompt(name: str, n_images: int) -> str:
    """The prompt text `name`'s template writes for one user turn with `n_images` images."""
    head, image, tail = TEMPLATES[name]
    return head + image * n_images + "describe the image ." + tail


def save_family(name: str, path: str | Path) -> Path:
    """Build the tiny model + processor of family `name` and `save_pretrained` both into `path`."""
    path = Path(path)
    model, processor = BUILDERS[name]()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
