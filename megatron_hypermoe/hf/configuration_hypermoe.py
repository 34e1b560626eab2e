"""Hugging Face configuration of a HyperMoE causal LM (Mixtral's fields plus the hyper sizes, and
Qwen-MoE's optional parts: shared expert, q/k norm, qkv bias, dense layers).

Self-contained (imports only transformers): the exporter copies this file next to the weights,
and ``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` loads it from there.
"""

from transformers import PretrainedConfig


class HyperMoeConfig(PretrainedConfig):
    model_type = "hypermoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=32000, hidden_size=768, intermediate_size=3072,
                 num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=None,
                 head_dim=None, hidden_act="silu", max_position_embeddings=1024,
                 rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.02,
                 num_local_experts=8, num_experts_per_tok=1, norm_topk_prob=False,
                 hyper_adapter_dim=64, hyper_hidden_size=128, hyper_expert_embedding_dim=128,
                 hyper_selection_hidden_size=128, hyper_selection_output_size=128,
                 hyper_layer_embedding_dim=10, hyper_init="hyperfanin", hyper_lr_mult=1.0,
                 moe_intermediate_size=None, shared_expert_intermediate_size=0,
                 shared_expert_gate=False, qkv_bias=False, qk_norm=False, mlp_only_layers=None,
                 use_cache=True, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        # True: softmax over the k selected logits (Mixtral; megatron's post-softmax routing).
        # False: softmax over all experts, keep the k largest unrenormalised (megatron's
        # pre-softmax routing, its default for top-1).
        self.norm_topk_prob = norm_topk_prob
        self.hyper_adapter_dim = hyper_adapter_dim
        self.hyper_hidden_size = hyper_hidden_size
        self.hyper_expert_embedding_dim = hyper_expert_embedding_dim
        self.hyper_selection_hidden_size = hyper_selection_hidden_size
        self.hyper_selection_output_size = hyper_selection_output_size
        self.hyper_layer_embedding_dim = hyper_layer_embedding_dim
        # How the hypernetwork's heads start when this model is built fresh ("hyperfanin": the
        # paper's uniform x 1e-3; "normal": N(0, initializer_range)), and the learning-rate
        # multiplier its generating weights were trained with (a number or "1/d_g"; recorded
        # for whoever trains on).
        self.hyper_init = hyper_init
        self.hyper_lr_mult = hyper_lr_mult
        # Each off by default, so that a config written before they existed loads as it was.
        # The experts' width (None: intermediate_size, which dense layers use).
        self.moe_intermediate_size = moe_intermediate_size
        # A shared expert of this width in every MoE layer (0: none), its output scaled by
        # sigmoid(shared_expert_gate(x)) when shared_expert_gate.
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.shared_expert_gate = shared_expert_gate
        self.qkv_bias = qkv_bias  # biases on q_proj, k_proj, v_proj (not o_proj)
        self.qk_norm = qk_norm  # RMSNorm of each query and key head (head_dim wide), before RoPE
        # Layers with a dense SwiGLU MLP (intermediate_size) instead of the MoE block (and so
        # without a HyperExpert); the others are MoE layers.
        self.mlp_only_layers = list(mlp_only_layers or [])
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
