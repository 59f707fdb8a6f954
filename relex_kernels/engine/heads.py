"""Whether a base's output head is tied to its input embedding (method §4), without importing transformers.

``tie_word_embeddings`` in ``config.json`` decides when present. Without it, transformers
uses its config class's default, which differs by ``model_type``; a head counts as tied
then only if the base also stores no head or one byte for byte equal to the embedding,
so that a distinct head is never written over.
"""

from __future__ import annotations

import numpy as np

from ..io import Checkpoint

#: model types whose transformers config class defaults to ``tie_word_embeddings=False``
#: (transformers 5.24: each ``CONFIG_MAPPING[t]()``); every other type defaults to True,
#: ``PretrainedConfig``'s historical default. tests/test_heads_and_api.py checks a sample.
UNTIED_BY_DEFAULT = frozenset("""
    afmoe apertus apertus1p5 apertus1p5_text arcee aria aria_text axk1 axk2 bailing_hybrid bamba beam bitnet blt
    blt_global_transformer blt_local_decoder blt_local_encoder blt_patcher bridgetower chameleon codegen
    cohere_asr cohere_compass cosmos3_edge cosmos3_edge_text cosmos3_omni cwm dbrx deepseek_ocr2
    deepseek_ocr2_encoder deepseek_ocr2_text deepseek_v2 deepseek_v3 deepseek_v32 deepseek_v4 diffllama doge
    dory dots1 dots3_note dots3_note_text emu3 emu3_text_model esmc eurobert evolla exaone exaone4 exaone4_5
    exaone_moe falcon_h1 fast_vlm flex_olmo flint fsmt fuyu git glm glm4 glm46v glm4_moe glm4_moe_lite glm4v
    glm4v_moe glm4v_moe_text glm5_next glm5_next_text glm_image glm_moe_dsa glm_ocr glmga gpt_neox gpt_oss gptj
    granite granite4_vision granite4_vision_text granitemoe granitemoe_swa granitemoehybrid granitemoeshared
    helium higgs_audio_v2 hrm_text hunyuan_v1_dense hunyuan_v1_moe hy_v3 hy_v4 hy_v4_vl hy_v4_vl_text
    hyperclovax idefics idefics2 idefics3 imagegpt internlm3 iquestcoder jais2 jamba kimi_linear kolibri1
    kyutai_speech_to_text laguna llama llama4 llama4_text llava llava_next llava_next_video llava_onevision
    longcat_flash mamba2 mellum mimo_v2_flash minicpmv4_6 minicpmv4_7 minimax minimax_m2 minimax_m3_vl
    minimax_m3_vl_text ministral ministral3 mistral mistral4 mistral_large4 mistral_large4_text mixtral
    mllama_text_model modernvbert molmo2 molmo2_text moonshine_streaming moshi moshi_depth muse_glimmer_text
    muse_spark_text musicgen_decoder musicgen_melody_decoder nanochat nemotron nemotron_h neucodec olmo olmo2
    olmo3 olmo_hybrid olmoe openai_privacy_filter perception_lm persimmon phi phi3 phi4_multimodal phimoe
    pix2struct pix2struct_text_model pp_formulanet_text qianfan_ocr qwen2 qwen2_5_omni_talker
    qwen2_5_omni_thinker qwen2_5_vl qwen2_moe qwen2_vl qwen3 qwen3_5 qwen3_5_moe qwen3_5_moe_text qwen3_5_text
    qwen3_moe qwen3_next qwen3_omni_moe_talker_code_predictor qwen3_omni_moe_talker_text qwen3_omni_moe_thinker
    qwen3_vl qwen3_vl_moe qwen4_exp qwen4_exp_text reformer rembert rwkv sarvam_mla sarvam_moe seed_oss smolvlm
    solar_open stablelm step3p5 ultrabert ultravbert unlimited_ocr unlimited_ocr_text vibevoice video_llama_3
    video_llava vipllava xcodec2 xlstm
""".split())


def declared_tie(config: dict) -> bool | None:
    """``tie_word_embeddings`` as the config states it (a ``text_config``'s wins), or None when absent."""
    tie = config.get("tie_word_embeddings")
    text = config.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in text:
        tie = text["tie_word_embeddings"]
    return None if tie is None else bool(tie)


def default_tie(config: dict) -> bool:
    """transformers' default for this config's model type (True for an unknown or missing type)."""
    text = config.get("text_config")
    types = [config.get("model_type"), text.get("model_type") if isinstance(text, dict) else None]
    return not any(isinstance(t, str) and t in UNTIED_BY_DEFAULT for t in types)


def same_bytes(ck: Checkpoint, a: str, b: str, chunk: int = 1 << 22) -> bool:
    """Whether tensors ``a`` and ``b`` of ``ck`` have the same dtype, shape and bytes (chunked, stops early)."""
    la, lb = ck.tensors[a], ck.tensors[b]
    if (la.info.dtype, la.info.shape) != (lb.info.dtype, lb.info.shape):
        return False
    n = la.info.numel
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        equal = np.array_equal(la.file.view(a, c0, c1).view(np.uint8), lb.file.view(b, c0, c1).view(np.uint8))
        la.file.release(a, c0, c1)
        lb.file.release(b, c0, c1)
        if not equal:
            return False
    return True
