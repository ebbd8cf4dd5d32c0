"""Tiny LLaVA-family backbones: LLaVA-1.5 (CLIP + Llama), LLaVA-NeXT (CLIP + Mistral, any-res tiles) and
LLaVA-OneVision (SigLIP + Qwen2, any-res tiles with a token budget).

Vision towers see 28 px crops with 14 px patches (2x2 patches), and the any-res grids only allow 28/56 px
layouts, so an image costs a few to a few dozen tokens.
"""

from __future__ import annotations

from .tiny_backbones import make_tokenizer

_CROP = 28  # vision tower input side (px)
_PATCH = 14
_CROP_SIZE = {"height": _CROP, "width": _CROP}
# Any-res layouts (height, width) for NeXT/OneVision: at most 2x2 tiles of 28 px, so images cost few tokens.
_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]

_LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=2048)
_CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, image_size=_CROP, patch_size=_PATCH, projection_dim=32)
_SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, image_size=_CROP, patch_size=_PATCH)

# llava-hf/llava-1.5-7b-hf: images first, then text, "USER: ... ASSISTANT:".
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\n... [/INST]".
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'][0]['text'] + '</s> ' }}"
    "{% endif %}{% endfor %}"
)
# llava-hf/llava-onevision-qwen2-0.5b-ov-hf: ChatML, images first in the user turn.
LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def _llama_tokenizer():
    return make_tokenizer(_LLAMA_SPECIALS, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                          extra_special_tokens={"image_token": "<image>"})


def _text_ids(tokenizer, bos: str | None, eos: str, pad: str) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(vocab_size=len(tokenizer), bos_token_id=ids(bos) if bos else None, eos_token_id=ids(eos),
                pad_token_id=ids(pad))


def _clip_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": _CROP}, crop_size=_CROP_SIZE)


def llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _llama_tokenizer()
    config = LlavaConfig(
        vision_config=dict(_CLIP),
        text_config=dict(model_type="llama", **_TEXT, **_text_ids(tokenizer, "<s>", "</s>", "<pad>")),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=(_CROP // _PATCH) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    # CLIP adds a CLS token (+1) that the "default" strategy drops again: 4 image tokens per image.
    processor = LlavaProcessor(image_processor=_clip_image_processor(), tokenizer=tokenizer, patch_size=_PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    return model, processor


def llava_next():
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = _llama_tokenizer()
    config = LlavaNextConfig(
        vision_config=dict(_CLIP),
        text_config=dict(model_type="mistral", **_TEXT, sliding_window=None,
                         **_text_ids(tokenizer, "<s>", "</s>", "<pad>")),
        image_token_index=tokenizer.image_token_id,
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": _CROP}, crop_size=_CROP_SIZE,
                                              image_grid_pinpoints=_PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=_PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_NEXT_TEMPLATE)
    return model, processor


def llava_onevision():
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = make_tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    config = LlavaOnevisionConfig(
        vision_config=dict(_SIGLIP),
        text_config=dict(model_type="qwen2", **_TEXT, **_text_ids(tokenizer, None, "<|im_end|>", "<|endoftext|>")),
        image_token_index=tokenizer.image_token_id,
        video_token_index=tokenizer.video_token_id,
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    size = {"height": _CROP, "width": _CROP}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=_PINPOINTS),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(_CROP // _PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_TEMPLATE,
    )
    return model, processor
