"""Tiny transformers architectures for the capture coverage test (tests/test_capture_coverage.py), as data.

One entry per architecture, one line each: ``arch(name, inputs, config, ...)``. ``build(entry, impl)``
turns an entry into a random-initialised model (seeded) and a batch of 2 whose second row is padded.
Needs only torch and transformers (the configs were checked on transformers 5.23, CPU).

Fields of an entry (the keywords of :func:`arch`):
  name        transformers' model type (``CONFIG_MAPPING`` key), or ``"type+what"`` for a variant of one
              that takes another attention path (``falcon+alibi``); ``model_type`` is the part before ``+``.
  inputs      ``"text"``, ``"text+decoder"`` (encoder-decoder: also ``decoder_input_ids [2, 5]``),
              ``"image"``, ``"video"``, ``"image+text"``, ``"features"``, ``"features+decoder"``,
              ``"waveform"``, ``"waveform+decoder"``.
  config      config keyword arguments (sub-configs as dicts).
  pad         padding sides tested: ``LR`` = left and right (decoders), ``R`` = right (encoders; the
              default for text, waveforms and image+text), ``()`` = no attention mask (the default for
              images, video and features).
  shapes      ``{input name: shape}`` of the non-token inputs (defaults: pixels ``[2, 3, 32, 32]``,
              waveform ``[2, 1600]``).
  modes       the ``attn_implementation`` values the model runs with on the CPU: ``"eager"``,
              ``"sdpa"``, ``"flex_attention"``; ``"<impl>:decode"`` is one KV-cache decoding step after a
              left-padded prefill.
  routes      how the model computes attention (the coverage table of README.md counts them):
              ``registry`` (transformers' attention-function registry or the file's
              ``eager_attention_forward``), ``own softmax`` (a softmax written in the modeling file),
              ``direct sdpa`` (the modeling file calls ``F.scaled_dot_product_attention`` itself),
              ``other`` (neither), and the features ``gqa``, ``sliding window``, ``softcap``, ``bias``
              (an additive bias: relative position, ALiBi, ``position_bias``), ``sink`` (attention
              sinks), ``cross-attention``.
  known       why attnstats does not capture the model correctly yet: one reason for every mode, or
              ``{mode: reason}`` (``{"sdpa-left": reason}`` for one padding side only). The test expects those cases to fail (strict xfail), so a fix makes
              it fail until the mark is removed.
  extra       extra inputs ``{name: "randn:d0,d1,..."}`` (seeded).
  time_axis   the time axis of ``input_features`` (for the padding mask of features).
  perturb     substrings of parameter names that are zero at initialisation and are redrawn (seeded), so
              that what they add is visible (BEiT's relative position bias table).
  extra_records  attention calls the model makes that its ``output_attentions`` does not return
              (AIMv2's attention-pooling head).
  reference   what ``output_attentions`` returns: ``"probs"``, or ``"scores"`` where the model returns its
              pre-softmax scores (SqueezeBERT); the test then takes their softmax.
  crop        ``output_attentions`` leaves out the first ``crop`` query and key positions of the matrix
              the model computes (CPM-Ant drops its 32 prompt positions).
"""
from __future__ import annotations

import copy

BATCH = 2
SEQ = 8
PAD = 3  # the second row has PAD padding tokens
DEC_SEQ = 5  # decoder_input_ids of encoder-decoders
LR = ("left", "right")
R = ("right",)

TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2)
GQA = dict(num_key_value_heads=2, head_dim=8)
LM = dict(TEXT, **GQA)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
              patch_size=8, num_channels=3)
SEQ2SEQ = dict(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=1, bos_token_id=0,
               eos_token_id=2, decoder_start_token_id=0)
WAVE = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            conv_dim=[32, 32], conv_stride=[4, 4], conv_kernel=[8, 8], num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4, pad_token_id=1, bos_token_id=0, eos_token_id=2)
XVECTOR = dict(tdnn_dim=[32, 32], tdnn_kernel=[3, 1], tdnn_dilation=[1, 1], xvector_output_dim=32)

INPUT_KINDS = ("text", "text+decoder", "image", "video", "image+text", "features", "features+decoder", "waveform",
               "waveform+decoder")
ROUTES = ("registry", "own softmax", "direct sdpa", "other", "gqa", "sliding window", "softcap", "bias", "sink",
          "cross-attention")
MODES = ("eager", "sdpa", "flex_attention", "eager:decode", "sdpa:decode")


def arch(name, inputs, config, *, pad=None, shapes=None, modes=("eager", "sdpa"), routes=("registry",), known=None,
         extra=None, time_axis=-1, perturb=(), extra_records=0, reference="probs", crop=0) -> dict:
    """One entry of :data:`ARCHITECTURES` (the fields are described in the module docstring)."""
    if inputs not in INPUT_KINDS:
        raise ValueError(f"{name}: inputs: expected one of {INPUT_KINDS}, got {inputs!r}")
    for r in routes:
        if r not in ROUTES:
            raise ValueError(f"{name}: routes: expected names from {ROUTES}, got {r!r}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"{name}: modes: expected names from {MODES}, got {m!r}")
    if reference not in ("probs", "scores"):
        raise ValueError(f"{name}: reference: expected 'probs' or 'scores', got {reference!r}")
    if isinstance(known, str):
        known = {m: known for m in modes}
    for m in known or {}:
        if m.split("-")[0] not in modes:
            raise ValueError(f"{name}: known: mode {m!r} is not in modes {modes}")
    if pad is None:
        pad = R if inputs.startswith(("text", "waveform")) or inputs == "image+text" else ()
    if shapes is None:
        shapes = {"image": {"pixel_values": (BATCH, 3, 32, 32)}, "image+text": {"pixel_values": (BATCH, 3, 32, 32)},
                  "waveform": {"input_values": (BATCH, 1600)}, "waveform+decoder": {"input_values": (BATCH, 1600)},
                  }.get(inputs, {})
    return dict(name=name, model_type=name.split("+")[0], inputs=inputs, config=config, pad=tuple(pad), shapes=shapes,
                modes=tuple(modes), routes=tuple(routes), known=dict(known or {}), extra=dict(extra or {}),
                time_axis=time_axis, perturb=tuple(perturb), extra_records=extra_records, reference=reference,
                crop=crop)


# fmt: off
ARCHITECTURES: list[dict] = [
    arch("albert", "text", dict(TEXT, embedding_size=32)),
    arch("bert", "text", TEXT, modes=("eager", "sdpa", "flex_attention")),
    arch("distilbert", "text", dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, hidden_dim=32, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    arch("electra", "text", dict(TEXT, embedding_size=32)),
    arch("roberta", "text", TEXT),
    arch("esm", "text", dict(TEXT, esmfold_config=dict(trunk=dict(structure_module=dict())))),
    arch("mobilebert", "text", dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, embedding_size=32, pad_token_id=1)),
    arch("nomic_bert", "text", dict(TEXT, head_dim=8)),
    arch("layoutlm", "text", TEXT),
    arch("clip_text_model", "text", dict(TEXT, projection_dim=32)),
    arch("splinter", "text", TEXT, modes=("eager",)),
    arch("modernbert", "text", dict(TEXT, local_attention=4), routes=("registry", "sliding window")),
    arch("deberta", "text", dict(TEXT, relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=16), modes=("eager",), routes=("own softmax",)),
    arch("deberta-v2", "text", dict(TEXT, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=16), modes=("eager",), routes=("own softmax",)),
    arch("roformer", "text", dict(TEXT, embedding_size=32), modes=("eager",), routes=("own softmax",)),
    arch("convbert", "text", dict(TEXT, embedding_size=32), modes=("eager",), routes=("own softmax",)),
    arch("squeezebert", "text", dict(TEXT, embedding_size=32), modes=("eager",), routes=("own softmax",), reference="scores"),
    arch("ibert", "text", TEXT, modes=("eager",), routes=("own softmax",)),
    arch("flaubert", "text", dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2), modes=("eager",), routes=("own softmax",)),
    arch("xlm", "text", dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2), modes=("eager",), routes=("own softmax",)),
    arch("megatron-bert", "text", TEXT, modes=("eager",), routes=("own softmax",)),
    arch("big_bird", "text", dict(TEXT, attention_type="original_full"), modes=("eager",), routes=("own softmax",)),
    arch("mpnet", "text", TEXT, modes=("eager",), routes=("own softmax", "bias")),
    arch("llama", "text", LM, pad=LR, modes=("eager", "sdpa", "flex_attention", "eager:decode", "sdpa:decode"), routes=("registry", "gqa")),
    arch("mistral", "text", LM, pad=LR, modes=("eager", "sdpa", "eager:decode", "sdpa:decode"), routes=("registry", "gqa")),
    arch("qwen2", "text", dict(TEXT, num_key_value_heads=2), pad=LR, modes=("eager", "sdpa", "eager:decode", "sdpa:decode"), routes=("registry", "gqa")),
    arch("qwen3", "text", LM, pad=LR, modes=("eager", "sdpa", "eager:decode", "sdpa:decode"), routes=("registry", "gqa")),
    arch("gemma", "text", LM, pad=LR, modes=("eager", "sdpa", "eager:decode", "sdpa:decode"), routes=("registry", "gqa")),
    arch("olmo2", "text", dict(TEXT, num_key_value_heads=2), pad=LR, modes=("eager", "sdpa", "eager:decode", "sdpa:decode"), routes=("registry", "gqa")),
    arch("starcoder2", "text", dict(TEXT, num_key_value_heads=2), pad=LR, modes=("eager", "sdpa", "eager:decode", "sdpa:decode"), routes=("registry", "gqa")),
    arch("granite", "text", dict(TEXT, num_key_value_heads=2), pad=LR, modes=("eager", "sdpa", "eager:decode", "sdpa:decode"), routes=("registry", "gqa")),
    arch("mistral+swa", "text", dict(LM, sliding_window=4), pad=LR, modes=("eager", "sdpa", "eager:decode", "sdpa:decode"), routes=("registry", "gqa", "sliding window")),
    arch("gemma3_text", "text", dict(LM, sliding_window=4), pad=LR, modes=("eager", "sdpa", "eager:decode", "sdpa:decode"), routes=("registry", "gqa", "sliding window")),
    arch("gemma2", "text", dict(LM, sliding_window=4), pad=LR, modes=("eager", "flex_attention"), routes=("registry", "gqa", "sliding window", "softcap")),
    arch("vaultgemma", "text", LM, pad=LR, modes=("eager",), routes=("registry", "gqa", "softcap")),
    arch("gpt_bigcode", "text", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64, pad_token_id=1, bos_token_id=0, eos_token_id=2), pad=LR, modes=("eager", "sdpa", "eager:decode", "sdpa:decode"), routes=("registry", "gqa")),
    arch("gpt2", "text", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64, pad_token_id=1, bos_token_id=0, eos_token_id=2), pad=LR),
    arch("gpt_neox", "text", TEXT, pad=LR),
    arch("opt", "text", dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, ffn_dim=64, pad_token_id=1, bos_token_id=0, eos_token_id=2), pad=LR),
    arch("phi", "text", dict(TEXT, num_key_value_heads=2), pad=LR),
    arch("biogpt", "text", TEXT, pad=LR),
    arch("stablelm", "text", dict(TEXT, num_key_value_heads=2), pad=LR),
    arch("ctrl", "text", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=1, bos_token_id=0, eos_token_id=2), pad=LR),
    arch("phi3", "text", dict(TEXT, num_key_value_heads=2), pad=LR, routes=("registry", "gqa")),
    arch("doge", "text", dict(TEXT, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2), pad=LR, routes=("registry", "gqa", "bias")),
    arch("mixtral", "text", dict(LM, num_local_experts=4, num_experts_per_tok=2), pad=LR, routes=("registry", "gqa")),
    arch("qwen2_moe", "text", dict(TEXT, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32), pad=LR, routes=("registry", "gqa")),
    arch("deepseek_v3", "text", dict(TEXT, num_key_value_heads=4, num_experts_per_tok=2, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1, n_group=1, topk_group=1), pad=LR),
    arch("jamba", "text", dict(TEXT, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, use_mamba_kernels=False), pad=LR),
    arch("bloom", "text", dict(vocab_size=99, hidden_size=32, n_layer=2, n_head=4, pad_token_id=1, bos_token_id=0, eos_token_id=2), pad=LR, modes=("eager",), routes=("own softmax", "bias")),
    arch("mpt", "text", dict(vocab_size=99, num_hidden_layers=2, num_attention_heads=4, d_model=32, max_seq_len=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, attn_config=dict()), pad=LR, modes=("eager",), routes=("own softmax", "bias")),
    arch("gpt_neo", "text", dict(vocab_size=99, hidden_size=32, intermediate_size=64, max_position_embeddings=64, num_layers=2, num_heads=4, pad_token_id=1, bos_token_id=0, eos_token_id=2, attention_types=[[["global", "local"], 1]], window_size=4), pad=LR, modes=("eager",), routes=("own softmax", "sliding window")),
    arch("gptj", "text", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, rotary_dim=4), pad=LR, modes=("eager",), routes=("own softmax",)),
    arch("codegen", "text", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_ctx=64, n_inner=64, bos_token_id=0, eos_token_id=2, rotary_dim=4), pad=LR, modes=("eager",), routes=("own softmax",)),
    arch("openai-gpt", "text", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=1, bos_token_id=0, eos_token_id=2), pad=LR, modes=("eager",), routes=("own softmax",)),
    arch("imagegpt", "text", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64, pad_token_id=1, bos_token_id=0, eos_token_id=2), pad=LR, modes=("eager",), routes=("own softmax",)),
    arch("xglm", "text", dict(vocab_size=99, num_attention_heads=4, max_position_embeddings=64, d_model=32, num_layers=2, ffn_dim=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0), pad=LR, modes=("eager",), routes=("own softmax",)),
    arch("gpt_neox_japanese", "text", dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2), pad=LR, modes=("eager",), routes=("own softmax",)),
    arch("git", "text", dict(TEXT, vision_config=VISION), pad=LR, modes=("eager",), routes=("own softmax",)),
    arch("falcon", "text", dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2), pad=LR, routes=("own softmax", "direct sdpa")),
    arch("falcon+alibi", "text", dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, alibi=True), pad=LR, routes=("own softmax", "direct sdpa", "bias"), known={"sdpa": "reference differs: transformers' eager Falcon adds ALiBi twice, its sdpa once"}),
    arch("falcon+gqa", "text", dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, new_decoder_architecture=True, num_kv_heads=2), pad=LR, modes=("eager", "sdpa", "eager:decode", "sdpa:decode"), routes=("own softmax", "direct sdpa", "gqa")),
    arch("cpmant", "text", dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4), pad=LR, modes=("eager",), routes=("own softmax", "bias"), crop=32),
    arch("xlnet", "text", dict(vocab_size=99, d_model=32, n_layer=2, n_head=4, pad_token_id=1, bos_token_id=0, eos_token_id=2), pad=LR, modes=("eager",), routes=("own softmax", "bias")),
    arch("gpt_oss", "text", dict(LM, num_local_experts=4, num_experts_per_tok=2), pad=LR, modes=("eager", "flex_attention", "eager:decode"), routes=("registry", "gqa", "sink")),
    arch("flint", "text", dict(LM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32), pad=LR, modes=("eager", "eager:decode"), routes=("registry", "gqa", "sink")),
    arch("mimo_v2_flash", "text", dict(LM, num_experts_per_tok=2, moe_intermediate_size=32, n_routed_experts=4, v_head_dim=8, n_group=1, topk_group=1), pad=LR, modes=("eager", "eager:decode"), routes=("registry", "gqa", "sink")),
    arch("hy_v4", "text", dict(LM, num_experts_per_tok=2, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1), pad=LR, modes=("eager", "eager:decode"), routes=("registry", "gqa", "sink")),
    arch("openai_privacy_filter", "text", dict(LM, num_local_experts=4, num_experts_per_tok=2), modes=("eager",), routes=("registry", "gqa", "sink")),
    arch("inkling2_text", "text", dict(**GQA, vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, num_experts_per_tok=2, moe_intermediate_size=32, n_routed_experts=4, pad_token_id=1, bos_token_id=0, eos_token_id=2), pad=LR, modes=("eager",), routes=("registry", "bias", "sink"), extra_records=4),
    arch("t5", "text+decoder", dict(vocab_size=99, d_model=32, num_layers=2, num_heads=4, d_ff=64, d_kv=8, num_decoder_layers=2, pad_token_id=1, eos_token_id=2), modes=("eager", "sdpa", "flex_attention"), routes=("registry", "bias", "cross-attention")),
    arch("mt5", "text+decoder", dict(vocab_size=99, d_model=32, num_layers=2, num_heads=4, d_ff=64, d_kv=8, num_decoder_layers=2, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0), routes=("registry", "bias", "cross-attention")),
    arch("switch_transformers", "text+decoder", dict(vocab_size=99, d_model=32, num_layers=2, num_heads=4, d_ff=64, d_kv=8, num_decoder_layers=2, num_experts=4, pad_token_id=1, bos_token_id=0, eos_token_id=2), modes=("eager",), routes=("registry", "bias", "cross-attention")),
    arch("umt5", "text+decoder", dict(vocab_size=99, d_model=32, num_layers=2, num_heads=4, d_ff=64, d_kv=8, num_decoder_layers=2, pad_token_id=1, eos_token_id=2, decoder_start_token_id=0), routes=("registry", "bias", "cross-attention")),
    arch("inkling_text", "text", dict(LM, num_experts_per_tok=2, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1), pad=LR, routes=("registry", "bias")),
    arch("wav2vec2-conformer", "waveform", dict(WAVE, **XVECTOR, max_source_positions=32), routes=("registry", "bias")),
    arch("wav2vec2-bert", "features", dict(**XVECTOR, vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_source_positions=32, pad_token_id=1, bos_token_id=0, eos_token_id=2, feature_projection_input_dim=32, conv_depthwise_kernel_size=3), pad=R, shapes={"input_features": (2, 16, 32)}, routes=("registry", "bias"), time_axis=1),
    arch("bart", "text+decoder", dict(SEQ2SEQ, max_position_embeddings=64), routes=("registry", "cross-attention")),
    arch("marian", "text+decoder", dict(SEQ2SEQ, max_position_embeddings=64), routes=("registry", "cross-attention")),
    arch("mbart", "text+decoder", dict(SEQ2SEQ, max_position_embeddings=64), routes=("registry", "cross-attention")),
    arch("pegasus", "text+decoder", dict(vocab_size=99, max_position_embeddings=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=1, eos_token_id=2, decoder_start_token_id=0), routes=("registry", "cross-attention")),
    arch("m2m_100", "text+decoder", dict(SEQ2SEQ, max_position_embeddings=64), routes=("registry", "cross-attention")),
    arch("blenderbot-small", "text+decoder", dict(SEQ2SEQ, max_position_embeddings=64), routes=("registry", "cross-attention")),
    arch("whisper", "features+decoder", dict(SEQ2SEQ, max_source_positions=32, max_target_positions=64, num_mel_bins=16), shapes={"input_features": (2, 16, 64)}, routes=("registry", "cross-attention")),
    arch("speech_to_text", "features+decoder", dict(SEQ2SEQ, max_source_positions=64, max_target_positions=64, input_feat_per_channel=16, input_channels=1, conv_channels=32), pad=R, shapes={"input_features": (2, 32, 16)}, modes=("eager",), routes=("registry", "cross-attention"), time_axis=1),
    arch("moonshine", "waveform+decoder", dict(vocab_size=99, hidden_size=32, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, decoder_num_attention_heads=4, decoder_num_hidden_layers=2, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0), routes=("registry", "cross-attention")),
    arch("t5gemma", "text+decoder", dict(vocab_size=99, encoder=LM, decoder=LM), modes=("eager",), routes=("registry", "cross-attention", "softcap", "gqa")),
    arch("fsmt", "text+decoder", dict(SEQ2SEQ, max_position_embeddings=64), modes=("eager",), routes=("own softmax", "cross-attention")),
    arch("mvp", "text+decoder", dict(SEQ2SEQ, max_position_embeddings=64), modes=("eager",), routes=("own softmax", "cross-attention")),
    arch("bigbird_pegasus", "text+decoder", dict(SEQ2SEQ, max_position_embeddings=64), modes=("eager",), routes=("registry", "own softmax", "cross-attention")),
    arch("gpt2+cross", "text", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, add_cross_attention=True), pad=LR, routes=("registry", "cross-attention"), extra={"encoder_hidden_states": "randn:2,6,32"}, known={"sdpa-left": "reference differs: transformers' eager and sdpa differ at pad-token query rows, which a cross-attention record keeps"}),
    arch("vit", "image", VISION, modes=("eager", "sdpa", "flex_attention")),
    arch("deit", "image", VISION),
    arch("dinov2", "image", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, num_channels=3)),
    arch("beit", "image", dict(VISION, vocab_size=99)),
    arch("clip_vision_model", "image", dict(VISION, projection_dim=32)),
    arch("siglip_vision_model", "image", VISION, extra_records=1),
    arch("segformer", "image", dict(num_hidden_layers=2, num_attention_heads=[1, 2], decoder_hidden_size=32, num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2])),
    arch("vit_mae", "image", dict(VISION, decoder_hidden_size=32, decoder_num_attention_heads=4, decoder_num_hidden_layers=2, decoder_intermediate_size=64), extra={"noise": "randn:2,16"}),
    arch("ijepa", "image", VISION),
    arch("videomae", "video", dict(VISION, decoder_hidden_size=32, decoder_num_attention_heads=4, decoder_num_hidden_layers=2, decoder_intermediate_size=64, num_frames=4, tubelet_size=2), shapes={"pixel_values": (2, 4, 3, 32, 32)}),
    arch("vivit", "video", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, num_channels=3, num_frames=4, tubelet_size=[2, 8, 8]), shapes={"pixel_values": (2, 4, 3, 32, 32)}),
    arch("detr", "image", dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_channels=3, use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=dict(model_type="resnet", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], out_features=["stage2"]), num_queries=6), modes=("eager",), routes=("registry", "cross-attention")),
    arch("pvt", "image", dict(num_attention_heads=[1, 2], image_size=32, num_channels=3, num_encoder_blocks=2, depths=[1, 1], sequence_reduction_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[4, 2], strides=[4, 2], mlp_ratios=[2, 2]), modes=("eager",), routes=("own softmax",)),
    arch("vitdet", "image", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, num_channels=3), modes=("eager",), routes=("own softmax",)),
    arch("data2vec-vision", "image", VISION, routes=("own softmax", "direct sdpa")),
    arch("beit+relpos", "image", dict(VISION, vocab_size=99, use_relative_position_bias=True), routes=("registry", "bias"), perturb=("relative_position_bias",)),
    arch("data2vec-vision+relpos", "image", dict(VISION, use_relative_position_bias=True), routes=("own softmax", "bias"), perturb=("relative_position_bias",)),
    arch("wav2vec2", "waveform", dict(WAVE, **XVECTOR)),
    arch("hubert", "waveform", WAVE),
    arch("data2vec-audio", "waveform", dict(WAVE, **XVECTOR)),
    arch("sew", "waveform", WAVE),
    arch("sew-d", "waveform", dict(WAVE, max_position_embeddings=64, position_buckets=8, max_relative_positions=16), modes=("eager",), routes=("own softmax",)),
    arch("wavlm", "waveform", dict(WAVE, **XVECTOR), modes=("eager",), routes=("other",), known="no capture: the attention runs inside F.multi_head_attention_forward"),
    arch("audio-spectrogram-transformer", "features", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=8, num_mel_bins=16, max_length=24, frequency_stride=8, time_stride=8), shapes={"input_values": (2, 24, 16)}),
    arch("qwen2_audio_encoder", "features", dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, max_source_positions=32, num_mel_bins=16), shapes={"input_features": (2, 16, 64)}),
    arch("parakeet_encoder", "features", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, num_mel_bins=16), shapes={"input_features": (2, 32, 16)}, routes=("registry", "bias")),
    arch("clip", "image+text", dict(projection_dim=32, vision_config=dict(VISION, projection_dim=32), text_config=dict(TEXT, projection_dim=32))),
    arch("siglip", "image+text", dict(vision_config=VISION, text_config=TEXT), extra_records=1),
    arch("owlvit", "image+text", dict(projection_dim=32, text_config=TEXT, vision_config=VISION)),
    arch("blip", "image+text", dict(projection_dim=32, text_config=dict(TEXT, encoder_hidden_size=32, projection_dim=32), vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, projection_dim=32, image_size=32, patch_size=8)), modes=("eager",), routes=("own softmax",)),
    arch("aimv2", "image+text", dict(projection_dim=32, vision_config=VISION, text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, eos_token_id=2)), extra_records=1),
    arch("tipsv2", "image+text", dict(text_config=TEXT, vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, num_channels=3))),
    arch("flava", "text", dict(hidden_size=32, projection_dim=32, text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, pad_token_id=1), image_config=dict(VISION, vocab_size=99), multimodal_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64), image_codebook_config=dict(vocab_size=99, hidden_size=32)), modes=("eager",), routes=("own softmax",)),
    arch("chinese_clip", "image+text", dict(projection_dim=32, vision_config=dict(VISION, projection_dim=32), text_config=TEXT)),
]
# fmt: on


def get(name: str) -> dict:
    """The entry named ``name`` (a model type or a ``"type+what"`` variant)."""
    for entry in ARCHITECTURES:
        if entry["name"] == name:
            return entry
    raise KeyError(f"name: no architecture entry named {name!r}")


def make_config(entry: dict, attn_implementation: str | None = None):
    """The transformers config of ``entry`` (a fresh copy: entries share their base dicts)."""
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[entry["model_type"]](**copy.deepcopy(entry["config"]))
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


def padding_mask(length: int, side: str):
    """``[2, length]`` long attention mask: row 0 all ones, row 1 with ``PAD`` zeros on ``side``."""
    import torch

    mask = torch.ones(BATCH, length, dtype=torch.long)
    if side == "left":
        mask[1, :PAD] = 0
    else:
        mask[1, length - PAD:] = 0
    return mask


def build(entry: dict, attn_implementation: str = "eager", padding: str | None = None):
    """``(model, inputs)``: the model of ``entry`` in eval mode (weights seeded) and a batch of 2.

    ``padding``: ``"left"`` or ``"right"``, one of ``entry["pad"]`` (default its first side), or None for an
    entry without padding. Text: ``input_ids [2, 8]`` and ``attention_mask``, whose second row has 3 pad
    tokens on that side (their ids set to the pad id). Encoder-decoders also get ``decoder_input_ids
    [2, 5]`` (no padding). Pixels, features and waveforms are seeded ``randn`` of ``entry["shapes"]``; a
    padded waveform or feature sequence has its second row masked (and a waveform zeroed) past 3/4 of its
    length. The same entry, implementation and side always give the same weights and inputs.

    Raises:
        ValueError: ``padding`` is not one of the entry's sides.
    """
    import torch
    import transformers

    sides = entry["pad"]
    if padding is None:
        padding = sides[0] if sides else None
    if (padding is None) != (not sides) or (padding is not None and padding not in sides):
        raise ValueError(f"padding: {entry['name']} is tested with padding {sides or None}, got {padding!r}")
    config = make_config(entry)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, attn_implementation=attn_implementation).eval()
    if entry["perturb"]:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if any(s in name for s in entry["perturb"]):
                    p.copy_(torch.randn(p.shape, generator=g))
    g = torch.Generator().manual_seed(0)
    kind = entry["inputs"]
    inputs = {}
    if kind.startswith("text") or kind == "image+text":
        vocab = int(getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", 99))
        ids = torch.randint(min(5, vocab - 2), vocab, (BATCH, SEQ), generator=g)
        mask = padding_mask(SEQ, padding or "right")
        pad_id = getattr(config, "pad_token_id", None)
        ids = ids.masked_fill(mask == 0, pad_id if isinstance(pad_id, int) and pad_id < vocab else 0)
        inputs["input_ids"] = ids
        if padding is not None:
            inputs["attention_mask"] = mask
    for name, shape in entry["shapes"].items():
        x = torch.randn(*shape, generator=g)
        if padding is not None and name == "input_values":  # a waveform: the second row is silence past 3/4
            x[1, shape[1] * 3 // 4:] = 0
            inputs["attention_mask"] = _tail_mask(shape[1])
        if padding is not None and name == "input_features":
            inputs["attention_mask"] = _tail_mask(shape[entry["time_axis"]])
        inputs[name] = x
    if kind.endswith("+decoder"):
        vocab = int(getattr(config, "vocab_size", None) or 99)
        inputs["decoder_input_ids"] = torch.randint(min(5, vocab - 2), vocab, (BATCH, DEC_SEQ), generator=g)
    for name, spec in entry["extra"].items():
        inputs[name] = torch.randn(*[int(x) for x in spec.removeprefix("randn:").split(",")], generator=g)
    return model, inputs


def _tail_mask(length: int):
    import torch

    mask = torch.ones(BATCH, length, dtype=torch.long)
    mask[1, length * 3 // 4:] = 0
    return mask
