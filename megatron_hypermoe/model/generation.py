"""Text generation from a GPTModel: greedy or nucleus (top-p) sampling, no KV cache.

Under tensor, expert or pipeline parallelism every rank of the job calls :func:`generate_ids`
with the same prompt and seed: the forward is collective, the vocabulary-parallel logits are
gathered, and the same samples come out on every rank (under pipeline parallelism the last stage
picks each token and sends it to the others).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_hypermoe.model.gpt import causal_attention_mask
from megatron_hypermoe.parallel.pipeline import broadcast_token, pipeline_size, pipelined_logits


def _tensor_parallel_size() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


@torch.no_grad()
def generate_ids(model, prompt_ids, max_new_tokens: int, max_sequence_length: int,
                 greedy: bool = True, top_p: float = 0.9, temperature: float = 1.0,
                 eod: int = None, generator: torch.Generator = None, vocab_size: int = None):
    """Continue prompt_ids (a list of ints); returns the new ids. ``generator``: a CPU
    generator (sampling runs on the host, whatever device the model is on)."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generate_ids samples on the host: pass a CPU torch.Generator, not "
                         f"one on {generator.device}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tp_size = _tensor_parallel_size()
    ids = list(prompt_ids)
    new = []
    for _ in range(max_new_tokens):
        window = ids[-max_sequence_length:]
        length = len(window)
        # Sequence parallelism splits the sequence over TP ranks: pad on the right to a
        # multiple of TP (causal attention keeps the real positions unaffected).
        padded = window + [window[-1]] * (-length % tp_size)
        tokens = torch.tensor([padded], device=device)
        positions = torch.arange(len(padded), device=device).unsqueeze(0)
        mask = causal_attention_mask(len(padded), device)
        pipelined = pipeline_size() > 1
        # Under pipeline parallelism only the last stage has logits; it picks the token.
        logits = pipelined_logits(model, tokens, positions, mask) if pipelined else \
            model(tokens, positions, mask)
        next_id = None
        if logits is not None:
            if tp_size > 1:
                logits = gather_from_tensor_model_parallel_region(logits)
            # The choice is made on the host: the token is read there anyway, a CPU generator
            # then serves any device, and one seed gives one sample on CPU and GPU alike.
            next_logits = logits[0, length - 1].float().cpu()
            if vocab_size is not None:  # padded vocabulary rows are not tokens
                next_logits = next_logits[:vocab_size]
            next_id = int(next_logits.argmax()) if greedy else \
                _sample_top_p(next_logits / temperature, top_p, generator)
        if pipelined:
            next_id = broadcast_token(next_id, device)
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
