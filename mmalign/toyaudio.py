"""Tiny text-to-audio pipelines built from configs in code, shaped like the real ones (no
downloads): used by the audio tests and by `pipelines/sample_score_audio.py --tiny`.

- AudioLDM2-shaped (`save_tiny_audioldm2`): a full `AudioLDM2Pipeline` folder (model_index.json):
  CLAP (RoBERTa text branch + HTSAT audio branch), T5 encoder, AudioLDM2ProjectionModel, GPT2
  (GPT2Model as in cvssp/audioldm2; 8 generated embeddings), AudioLDM2UNet2DConditionModel
  (cross-attention to GPT2 and to T5),
  a 1-channel mel-VAE and a SpeechT5HifiGan vocoder, DDIM scheduler; sizes as diffusers' own
  AudioLDM2 fast tests, smaller where possible.
- Tango-shaped (`save_tiny_tango`): UNet2DConditionModel + T5 encoder (attention mask passed as
  `encoder_attention_mask`) + the same mel-VAE and vocoder, v-prediction DDPM scheduler (Tango
  trains with SD2.1's scheduler config).
- `save_tiny_clap`: a ClapModel + ClapProcessor folder for `mmalign score --scorer clap=...`.

The vocoder upsamples by 4·5·8 = 160, the real hop, so one mel frame is 10 ms at 16 kHz as in
AudioLDM; mels have 16 bins (real: 64). The UNet's sample_size 16 (latent frames, VAE factor 2)
makes the pipeline's default clip 32 frames = 0.32 s. Tokenizers are character-level: a RoBERTa
byte-level BPE without merges and a T5 unigram over single characters.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

SAMPLE_RATE = 16000
N_MELS = 16
FRAMES = 32  # mel frames of a default clip (0.32 s)
T5_DIM, CLAP_DIM, GPT2_DIM = 32, 16, 16
CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def tiny_roberta_tokenizer():
    from transformers import RobertaTokenizer

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", "Ġ"])}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault("Ġ" + c, len(vocab))
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=64)


def tiny_t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=64)


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=64, d_model=T5_DIM, d_ff=37, d_kv=8, num_heads=2, num_layers=2,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def tiny_clap():
    from transformers import ClapAudioConfig, ClapConfig, ClapModel, ClapTextConfig

    text = ClapTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=16, intermediate_size=37,
                          num_attention_heads=2, num_hidden_layers=2, vocab_size=128, projection_dim=CLAP_DIM)
    audio = ClapAudioConfig(spec_size=64, window_size=4, num_mel_bins=64, intermediate_size=37, depths=[2, 2],
                            num_attention_heads=[2, 2], num_hidden_layers=2, hidden_size=192, projection_dim=CLAP_DIM,
                            patch_size=2, patch_stride=2, patch_embed_input_channels=1)
    return ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=CLAP_DIM))


def tiny_clap_feature_extractor():
    """48 kHz, 64 mel bins as the released CLAP extractors; a long hop keeps the tiny model fast."""
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(feature_size=64, sampling_rate=48000, hop_length=7900, max_length_s=1,
                                fft_window_size=1024)


def tiny_mel_vae():
    """1-channel AutoencoderKL (mel in, mel out), 2 blocks: (1, T, M) -> (4, T/2, M/2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=8, sample_size=FRAMES, scaling_factor=0.5)


def tiny_vocoder():
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=N_MELS, sampling_rate=SAMPLE_RATE, upsample_initial_channel=16, upsample_rates=[4, 5, 8],
        upsample_kernel_sizes=[8, 10, 16], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        normalize_before=False))
    # transformers initialises it near zero (clips of amplitude ~1e-7: silence to a scorer); a
    # 1/sqrt(fan_in) init makes audible clips (std ~0.2) that differ with the mel
    with torch.no_grad():
        for name, p in vocoder.named_parameters():
            if p.ndim > 1:
                fan_in = p.shape[0] * p.shape[2] if name.startswith("upsampler") else p[0].numel()
                p.normal_(0, fan_in**-0.5)
    return vocoder


def tiny_audioldm2_unet():
    from diffusers import AudioLDM2UNet2DConditionModel

    return AudioLDM2UNet2DConditionModel(
        sample_size=FRAMES // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=([None, GPT2_DIM, T5_DIM], [None, GPT2_DIM, T5_DIM]), attention_head_dim=4,
        norm_num_groups=8)


def tiny_tango_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=FRAMES // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=T5_DIM, attention_head_dim=4, norm_num_groups=8)


def tiny_audioldm2_pipeline(seed: int = 0) -> Any:
    from diffusers import AudioLDM2Pipeline, AudioLDM2ProjectionModel, DDIMScheduler
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    language_model = GPT2Model(GPT2Config(n_embd=GPT2_DIM, n_head=2, n_layer=2, vocab_size=64, n_positions=64,
                                                bos_token_id=0, eos_token_id=0))
    language_model.config.max_new_tokens = 8
    return AudioLDM2Pipeline(
        vae=tiny_mel_vae(), text_encoder=tiny_clap(), text_encoder_2=tiny_t5(),
        projection_model=AudioLDM2ProjectionModel(text_encoder_dim=CLAP_DIM, text_encoder_1_dim=T5_DIM,
                                                  langauge_model_dim=GPT2_DIM),
        language_model=language_model, tokenizer=tiny_roberta_tokenizer(), tokenizer_2=tiny_t5_tokenizer(),
        feature_extractor=tiny_clap_feature_extractor(), unet=tiny_audioldm2_unet(),
        scheduler=DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False),
        vocoder=tiny_vocoder())


def save_tiny_audioldm2(path: str | Path, seed: int = 0) -> Path:
    """An AudioLDM2Pipeline folder (model_index.json + components) at `path`."""
    path = Path(path)
    tiny_audioldm2_pipeline(seed).save_pretrained(path)
    return path


def save_tiny_tango(path: str | Path, seed: int = 0, prediction_type: str = "v_prediction") -> Path:
    """unet/, vae/, text_encoder/ (T5), tokenizer/, scheduler/ (DDPM), vocoder/ at `path`."""
    from diffusers import DDPMScheduler

    path = Path(path)
    torch.manual_seed(seed)
    tiny_tango_unet().save_pretrained(path / "unet")
    tiny_mel_vae().save_pretrained(path / "vae")
    tiny_t5().save_pretrained(path / "text_encoder")
    tiny_t5_tokenizer().save_pretrained(path / "tokenizer")
    tiny_vocoder().save_pretrained(path / "vocoder")
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type=prediction_type).save_pretrained(path / "scheduler")
    return path


def save_tiny_clap(path: str | Path, seed: int = 0) -> Path:
    """A random-weight CLAP scorer folder (ClapModel + ClapProcessor)."""
    from transformers import ClapProcessor

    path = Path(path)
    torch.manual_seed(seed)
    tiny_clap().save_pretrained(path)
    processor = ClapProcessor(feature_extractor=tiny_clap_feature_extractor(), tokenizer=tiny_roberta_tokenizer())
    processor.save_pretrained(path)
    return path
