"""Text generation from a GPTModel: greedy or nucleus (top-p) sampling, no KV cache."""

from __future__ import annotations

import torch

from megatron_hypermoe.model import causal_attention_mask


@torch.no_grad()
def generate_ids(model, prompt_ids, max_new_tokens: int, max_sequence_length: int,
                 greedy: bool = True, top_p: float = 0.9, temperature: float = 1.0,
                 eod: int = None, generator: torch.Generator = None, vocab_size: int = None):
    """Continue prompt_ids (a list of ints); returns the new ids."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    new = []
    for _ in range(max_new_tokens):
        window = ids[-max_sequence_length:]
        tokens = torch.tensor([window], device=device)
        positions = torch.arange(len(window), device=device).unsqueeze(0)
        logits = model(tokens, positions, causal_attention_mask(len(window), device))
        next_logits = logits[0, -1].float()
        if vocab_size is not None:  # padded vocabulary rows are not tokens
            next_logits = next_logits[:vocab_size]
        next_id = int(next_logits.argmax()) if greedy else \
            _sample_top_p(next_logits / temperature, top_p, generator)
        if eod is not None and next_id == eod:
            break
        ids.append(next_id)
        new.append(next_id)
    model.train(was_training)
    return new


def _sample_top_p(logits, top_p, generator):
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # always keeps the top token
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])
