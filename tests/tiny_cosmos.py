"""Tiny random Cosmos-Predict2.5 models, saved in the on-disk layout of the real diffusers checkpoint.

The real checkpoint (nvidia/Cosmos-Predict2.5-2B, branch `diffusers/base/post-trained`) is a pipeline folder:
  model_index.json, transformer/ (CosmosTransformer3DModel), vae/ (AutoencoderKLWan, the Wan 2.1 VAE),
  text_encoder/ (Qwen2_5_VLForConditionalGeneration, Cosmos-Reason1-7B), tokenizer/, scheduler/ (UniPC).
`save_tiny_pipeline` writes the same folders with the same classes, scaled down so that a forward pass takes
milliseconds on one CPU core; nothing is downloaded. The tiny Qwen has 2 layers of width 16, so its
"every layer normalised and concatenated" embedding is [B, 512, 32] where the real one is [B, 512, 100352];
the transformer's cross-attention projection takes 32 channels accordingly.

The pipeline refuses to run without a safety checker (it wants the `cosmos_guardrail` package);
`PassThroughSafetyChecker` is the minimal object its __call__ touches, for tests only.
"""
from __future__ import annotations

import json
import os
import string

import torch

TEXT_LAYERS, TEXT_WIDTH = 2, 16  # prompt embedding width = TEXT_LAYERS * TEXT_WIDTH
PROMPT_DIM = TEXT_LAYERS * TEXT_WIDTH


def tiny_transformer(seed: int = 0):
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(seed)
    # same structure as the real 2B config (17 input channels = 16 latent + condition mask, padding mask
    # concatenated, no learnable position embedding, Qwen projection), widths scaled down
    model = CosmosTransformer3DModel(
        in_channels=16 + 1, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=2,
        mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=4, max_size=(32, 64, 64), patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0), concat_padding_mask=True, extra_pos_embed_type=None,
        use_crossattn_projection=True, crossattn_proj_in_channels=PROMPT_DIM, encoder_hidden_states_channels=16)
    return model  # its random init already predicts velocities of order one (std ~0.6)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    # 4x in time, 8x in space, 16 latent channels, like the real Wan 2.1 VAE
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def tiny_tokenizer():
    """A character-level tokenizer with a Qwen-style chat template (system/user turns), built locally."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<|endoftext|>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}")
    return tok


def tiny_text_encoder(seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=128, hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=TEXT_LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                         bos_token_id=2, eos_token_id=3, pad_token_id=0),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_WIDTH,
                           fullatt_block_indexes=[0]),
        image_token_id=124, video_token_id=125, vision_start_token_id=126, vision_end_token_id=127)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_scheduler():
    from diffusers import UniPCMultistepScheduler

    # the settings diffusers' conversion script writes for Cosmos-Predict2.5
    return UniPCMultistepScheduler(use_karras_sigmas=True, use_flow_sigmas=True, prediction_type="flow_prediction",
                                   sigma_max=200.0, sigma_min=0.01)


class PassThroughSafetyChecker:
    """Stands in for cosmos_guardrail's checker in tests: accepts every prompt; the pipeline runs its video
    check only on instances of the real class, so no frame is altered."""

    def to(self, *args, **kwargs):
        return self

    def check_text_safety(self, prompt: str) -> bool:
        return True


def save_tiny_pipeline(path: str, seed: int = 0) -> str:
    """Writes a tiny Cosmos-Predict2.5 pipeline folder (real layout, random weights) and returns `path`."""
    os.makedirs(path, exist_ok=True)
    tiny_transformer(seed).save_pretrained(os.path.join(path, "transformer"))
    tiny_vae(seed + 1).save_pretrained(os.path.join(path, "vae"))
    tiny_text_encoder(seed + 2).save_pretrained(os.path.join(path, "text_encoder"))
    tiny_tokenizer().save_pretrained(os.path.join(path, "tokenizer"))
    tiny_scheduler().save_pretrained(os.path.join(path, "scheduler"))
    import diffusers

    index = {"_class_name": "Cosmos2_5_PredictBasePipeline", "_diffusers_version": diffusers.__version__,
             "safety_checker": [None, None],
             "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "transformer": ["diffusers", "CosmosTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLWan"]}
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return path


def load_pipeline(path: str, **components):
    """The diffusers pipeline from a (tiny or exported) folder, with the test safety checker."""
    from diffusers import Cosmos2_5_PredictBasePipeline

    return Cosmos2_5_PredictBasePipeline.from_pretrained(path, safety_checker=PassThroughSafetyChecker(),
                                                         **components)


# diffusers name -> name in NVIDIA's original Cosmos-Predict2 / 2.5 checkpoints (which FastGen's DMD2 keeps under
# "net."), applied in this order; the inverse of what diffusers' single-file converter does
_ORIGINAL_NAMES = (
    ("transformer_blocks", "blocks"), ("time_embed.t_embedder", "t_embedder.1"), ("time_embed.norm", "t_embedding_norm"),
    ("norm1.linear_1", "adaln_modulation_self_attn.1"), ("norm1.linear_2", "adaln_modulation_self_attn.2"),
    ("norm2.linear_1", "adaln_modulation_cross_attn.1"), ("norm2.linear_2", "adaln_modulation_cross_attn.2"),
    ("norm3.linear_1", "adaln_modulation_mlp.1"), ("norm3.linear_2", "adaln_modulation_mlp.2"),
    ("attn1", "self_attn"), ("attn2", "cross_attn"), ("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"),
    ("to_out.0", "output_proj"), ("norm_q", "q_norm"), ("norm_k", "k_norm"), ("ff.net.0.proj", "mlp.layer1"),
    ("ff.net.2", "mlp.layer2"), ("patch_embed.proj", "x_embedder.proj.1"),
    ("norm_out.linear_1", "final_layer.adaln_modulation.1"), ("norm_out.linear_2", "final_layer.adaln_modulation.2"),
    ("proj_out", "final_layer.linear"))


def to_original_keys(sd: dict) -> dict:
    """A diffusers CosmosTransformer3DModel state dict under the original checkpoint's key names."""
    out = {}
    for k, v in sd.items():
        for new, old in _ORIGINAL_NAMES:
            k = k.replace(new, old)
        out[k] = v
    return out
