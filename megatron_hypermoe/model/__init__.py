"""The model: config (megatron-core's TransformerConfig plus the HyperMoE sizes), the per-layer
selection embedding and the shared hypernetwork, the HyperExpert forms, the MoE layers with a side
path (HyperMoE and the static-adapter ablation), the GPT builder, and initialisation by global
parameter name."""
