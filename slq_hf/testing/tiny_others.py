"""Tiny InternVL, Idefics3, SmolVLM and Gemma 3 backbones.

Every vision tower sees 56 px images in 14 px patches (4x4 patches); pixel shuffle (InternVL, Idefics3, SmolVLM) or
average pooling (Gemma 3) turns them into 4 image tokens per image or tile.
"""

from __future__ import annotations

from .tiny_backbones import CHATML_TEMPLATE, make_tokenizer

_IMAGE = 56  # vision tower input side (px)
_PATCH = 14
_TOKENS_PER_IMAGE = (_IMAGE // _PATCH) ** 2 // 4  # after a 2x2 pixel shuffle / pooling
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=2048)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=_IMAGE,
               patch_size=_PATCH)


def _text_ids(tokenizer, bos: str | None, eos: str, pad: str) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(vocab_size=len(tokenizer), bos_token_id=ids(bos) if bos else None, eos_token_id=ids(eos),
                pad_token_id=ids(pad))


# --------------------------------------------------------------------------------------------------------- InternVL
_INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]


def internvl():
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tokenizer = make_tokenizer(
        _INTERNVL_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )
    config = InternVLConfig(
        vision_config=dict(_VISION, image_size=[_IMAGE, _IMAGE], patch_size=[_PATCH, _PATCH]),
        text_config=dict(model_type="qwen2", **_TEXT, **_text_ids(tokenizer, None, "<|im_end|>", "<|endoftext|>")),
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=_TOKENS_PER_IMAGE,
        downsample_ratio=0.5,
    )
    model = InternVLForConditionalGeneration(config)
    size = {"height": _IMAGE, "width": _IMAGE}
    # At most 2 tiles (+ a thumbnail when tiled) instead of 12, so wide images still exercise the tiling path cheaply.
    image_processor = GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=2)
    # InternVL3-hf writes <IMG_CONTEXT> for an image; the processor expands it to <img><IMG_CONTEXT>*n</img>.
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=InternVLVideoProcessor(size=size),
                                  image_seq_length=_TOKENS_PER_IMAGE,
                                  chat_template=CHATML_TEMPLATE.replace("{IMAGE}", "<IMG_CONTEXT>\n"))
    return model, processor


# ------------------------------------------------------------------------------------------------ Idefics3 / SmolVLM
def _idefics_specials(begin: str, end: str) -> list[str]:
    rows_cols = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    return [begin, end, "<pad>", "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
            *rows_cols]


def _idefics_template(prefix: str) -> str:
    # HuggingFaceM4/Idefics3-8B-Llama3 and SmolVLM-Instruct: "User:<image>text<end_of_utterance>\nAssistant:".
    return (
        prefix + "{% for message in messages %}{{ message['role'] | capitalize }}"
        "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
        "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
        "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )


def _idefics_image_kwargs() -> dict:
    # No tiling: one 56 px global image per input (the real models split into up to 4x4 tiles of 364 px).
    return dict(do_image_splitting=False, size={"longest_edge": _IMAGE}, max_image_size={"longest_edge": _IMAGE})


def idefics3():
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    tokenizer = make_tokenizer(_idefics_specials("<|begin_of_text|>", "<|end_of_text|>"), vocab_size=448,
                               bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>", pad_token="<pad>")
    config = Idefics3Config(
        vision_config=dict(_VISION),
        text_config=dict(model_type="llama", **_TEXT,
                         **_text_ids(tokenizer, "<|begin_of_text|>", "<end_of_utterance>", "<pad>")),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    model = Idefics3ForConditionalGeneration(config)
    processor = Idefics3Processor(image_processor=Idefics3ImageProcessor(**_idefics_image_kwargs()),
                                  tokenizer=tokenizer, image_seq_len=_TOKENS_PER_IMAGE,
                                  chat_template=_idefics_template("<|begin_of_text|>"))
    return model, processor


def smolvlm():
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    tokenizer = make_tokenizer(_idefics_specials("<|im_start|>", "<|im_end|>"), vocab_size=448,
                               eos_token="<end_of_utterance>", pad_token="<pad>",
                               extra_special_tokens={"image_token": "<image>",
                                                     "fake_image_token": "<fake_token_around_image>",
                                                     "global_image_token": "<global-img>",
                                                     "end_of_utterance_token": "<end_of_utterance>"})
    config = SmolVLMConfig(
        vision_config=dict(_VISION),
        text_config=dict(model_type="llama", **_TEXT, **_text_ids(tokenizer, None, "<end_of_utterance>", "<pad>")),
        image_token_id=tokenizer.image_token_id,
        scale_factor=2,
    )
    model = SmolVLMForConditionalGeneration(config)
    processor = SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**_idefics_image_kwargs()),
                                 tokenizer=tokenizer,
                                 video_processor=SmolVLMVideoProcessor(**_idefics_image_kwargs()),
                                 image_seq_len=_TOKENS_PER_IMAGE, chat_template=_idefics_template("<|im_start|>"))
    return model, processor


# ---------------------------------------------------------------------------------------------------------- Gemma 3
_GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>"]

# google/gemma-3-4b-it, without the system-prompt branch: "<bos><start_of_turn>user\n<start_of_image>text...".
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    tokenizer = make_tokenizer(_GEMMA_SPECIALS, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                               unk_token="<unk>",
                               extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                     "image_token": "<image_soft_token>"})
    config = Gemma3Config(
        # One sliding and one global layer, as Gemma 3 interleaves them; the window is shorter than an image prompt so
        # the sliding mask really cuts something.
        text_config=dict(**_TEXT, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                         layer_types=["sliding_attention", "full_attention"],
                         **_text_ids(tokenizer, "<bos>", "<eos>", "<pad>")),
        vision_config=dict(model_type="siglip_vision_model", **_VISION),
        mm_tokens_per_image=_TOKENS_PER_IMAGE,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
    )
    model = Gemma3ForConditionalGeneration(config)
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": _IMAGE, "width": _IMAGE}),
                                tokenizer=tokenizer, image_seq_length=_TOKENS_PER_IMAGE, chat_template=GEMMA3_TEMPLATE)
    return model, processor
