"""FLUX.2 [dev] (`modality: flux2_dev`): Flow-DPO (`FlowObjective`, mmalign/modalities/flow.py) on a
`Flux2Transformer2DModel` with its guidance embedding, as diffusers' Flux2Pipeline
(pipelines/flux2/pipeline_flux2.py, diffusers 0.42.1) encodes and calls it, and as diffusers'
examples/dreambooth/train_dreambooth_lora_flux2.py trains it. Everything but the prompt and the
guidance is FLUX.2 [klein]'s (mmalign/families/flux2.py: latents, packing, ids, shift, target):

- conditioning (`_get_mistral_3_small_prompt_embeds`): each prompt as the conversation
  `format_input(prompt, SYSTEM_MESSAGE)` = [system turn (SYSTEM_MESSAGE), user turn (the prompt with
  "[IMG]" removed)], through the tokenizer's (a PixtralProcessor) `apply_chat_template`
  (add_generation_prompt=False, padding to max_sequence_length 512, truncation); the
  Mistral3ForConditionalGeneration hidden_states of layers (10, 20, 30) stacked and flattened per
  token: (n, L, 3·D) = (n, 512, 15360) for Mistral-Small-3.x (D = 5120, the transformer's
  joint_attention_dim); txt_ids (n, L, 4) rows (0, 0, 0, l);
- guidance: the transformer config has `guidance_embeds` (FLUX.2 [dev] is guidance-distilled); the
  call gets guidance = `GUIDANCE_SCALE` (n,) float32, as the training script's
  `torch.full([1], args.guidance_scale).expand(bsz)` with its default --guidance_scale 3.5 (the
  pipeline's sampling default is 4.0; validation passes `diffusion.validation_guidance` there);
- the call: hidden_states (N, h·w, 128) packed latents, timestep σ, img_ids / txt_ids, output's
  first h·w tokens = v = ε - x0 (flux2.Flux2Transformer).

LoRA targets (configs/flux2/flow_dpo_lora_dev.yaml): the training script's default when
--lora_layers is not given: to_k, to_q, to_v, to_out.0, to_qkv_mlp_proj and
single_transformer_blocks.{0..47}.attn.to_out.

Dropped captions become encode("") (the pipeline has no negative prompt: a guidance-distilled model
samples without CFG; the dev recipe keeps caption_dropout 0); `null_prompt: zeros` is refused.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from mmalign.families import Family, PipelineLayout, TextEncoderSpec
from mmalign.families.flux2 import Flux2KleinText, build_flux2
from mmalign.modalities.text import MASK

DEV_LAYERS = (10, 20, 30)  # Flux2Pipeline.encode_prompt's text_encoder_out_layers
GUIDANCE_SCALE = 3.5  # train_dreambooth_lora_flux2.py --guidance_scale default


class Flux2DevText(Flux2KleinText):
    """Mistral3 hidden states of layers (10, 20, 30) of the system + user conversation (module
    docstring); `encode` (stacking the layers per token) is klein's."""

    def __init__(self, text_encoders: list[Any], tokenizers: list[Any], max_sequence_length: int = 512,
                 layers: Sequence[int] = DEV_LAYERS) -> None:
        super().__init__(text_encoders, tokenizers, max_sequence_length, layers)

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"input_ids": (n, L), "input_ids_mask": (n, L)}, L = max_sequence_length: the pipeline's
        `apply_chat_template` call on `format_input(prompts, SYSTEM_MESSAGE)`."""
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        out = self.tokenizers[0].apply_chat_template(
            format_input(prompts=prompts, system_message=SYSTEM_MESSAGE), add_generation_prompt=False,
            tokenize=True, return_dict=True, return_tensors="pt", padding="max_length", truncation=True,
            max_length=self.max_sequence_length)
        return {"input_ids": out["input_ids"], MASK: out["attention_mask"]}


def build(cfg: Any, use_cache: bool = True, trained: bool = True) -> tuple[Any, Any, None]:
    """(trainable Flux2Transformer2DModel, likelihood owning the FLUX.2 VAE and the Mistral3 text
    encoder, None): `flux2.build_flux2` with the Mistral prompt and guidance 3.5."""
    return build_flux2(cfg, FAMILY, Flux2DevText, GUIDANCE_SCALE, use_cache, trained)


FAMILY = Family(
    name="flux2_dev", summary="FLUX.2 [dev] flow transformer: Mistral3 layers 10/20/30, guidance embedding, "
                              "bn-normalised 2x2-patchified latents, Flow-DPO",
    kind="image", build=build, trained="transformer",
    layout=PipelineLayout("transformer", "Flux2Transformer2DModel", "FlowMatchEulerDiscreteScheduler", "flow pipeline",
                          vae_class="AutoencoderKLFlux2"),
    text_encoders=(TextEncoderSpec("text_encoder", "tokenizer", "transformers:Mistral3ForConditionalGeneration",
                                   tokenizer_cls="transformers:AutoProcessor"),),
    pipeline="Flux2Pipeline", export_formats=("merged", "unet", "lora"), cache=True, validation=True,
    sample="images", zeros_null_prompt=False)
