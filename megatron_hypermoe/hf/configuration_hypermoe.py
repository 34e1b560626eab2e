"""Hugging Face configuration of a HyperMoE causal LM (Mixtral's fields plus the hyper sizes).

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
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
