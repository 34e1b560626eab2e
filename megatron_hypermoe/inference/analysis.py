"""What a trained MoE / HyperMoE checkpoint does with its experts, on some text.

Per MoE layer:
- expert load: the fraction of routed token slots each expert receives (heatmap);
- for HyperMoE, the selection embedding s_t (sum of the embeddings of the experts token t did NOT
  select) compared, by cosine similarity, with the embeddings of the experts it DID select and
  with those it did not: the paper's question whether the side path carries information the
  selected experts lack. s is built from the unselected embeddings, so it leans towards them by
  construction; the informative numbers are the selected-expert similarity, its sign and how
  it changes with training;
- for HyperMoE (and the static-adapter ablation), how large the side path's output is next to the
  experts' output: RMS(y_side) / RMS(y_experts).
``tools/analyze_experts.py`` writes these as PNGs, a JSON file and a short text summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import List

import torch

from megatron_hypermoe.errors import CheckpointError
from megatron_hypermoe.inference.evaluation import corpus_ids, megatron_token_nll, windows
from megatron_hypermoe.model.hypermoe_layer import HyperMoELayer
from megatron_hypermoe.model.side_path import SidePathMoELayer


@dataclasses.dataclass
class LayerStatistics:
    load: torch.Tensor  # [E] routed token slots
    tokens: int = 0
    side_sq: float = 0.0
    experts_sq: float = 0.0
    cos_selected: float = 0.0
    n_selected: int = 0
    cos_unselected: float = 0.0
    n_unselected: int = 0

    def as_dict(self) -> dict:
        out = {"load_fraction": (self.load / self.load.sum().clamp_min(1)).tolist(),
               "max_over_mean_load": float(self.load.max() / self.load.mean().clamp_min(1e-9))}
        if self.tokens and self.experts_sq:
            out["side_over_experts_rms"] = (self.side_sq / self.experts_sq) ** 0.5
        if self.n_selected:
            out["cos_selection_vs_selected"] = self.cos_selected / self.n_selected
        if self.n_unselected:
            out["cos_selection_vs_unselected"] = self.cos_unselected / self.n_unselected
        return out


class ExpertAnalyzer:
    """Hooks on every MoE layer's router (load) and side path (norms, similarities)."""

    def __init__(self, model):
        from megatron.core.transformer.moe.moe_layer import MoELayer

        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        # (counted on the model's device: the router's map never leaves it)
        self.stats = [LayerStatistics(load=torch.zeros(layer.config.num_moe_experts,
                                                       dtype=torch.float64,
                                                       device=layer.router.weight.device))
                      for layer in self.layers]
        for index, layer in enumerate(self.layers):
            layer.router.register_forward_hook(self._count_load(index))
            if isinstance(layer, SidePathMoELayer):
                layer.output_recorder = self._record_side_path(index)

    def _count_load(self, index):
        def hook(module, inputs, outputs):
            self.stats[index].load += outputs[1].detach().sum(dim=0).to(torch.float64)
        return hook

    def _record_side_path(self, index):
        def record(layer, hidden, routing_map, experts_output, side_output):
            stats = self.stats[index]
            stats.tokens += routing_map.shape[0]
            stats.side_sq += float(side_output.detach().double().pow(2).sum())
            stats.experts_sq += float(experts_output.detach().double().pow(2).sum())
            if isinstance(layer, HyperMoELayer):
                s = layer.selection.selection_embedding(routing_map).detach()
                embeddings = layer.selection.embedding.weight.detach()
                cos = torch.nn.functional.normalize(s, dim=-1) @ \
                    torch.nn.functional.normalize(embeddings, dim=-1).t()
                stats.cos_selected += float(cos[routing_map].double().sum())
                stats.n_selected += int(routing_map.sum())
                stats.cos_unselected += float(cos[~routing_map].double().sum())
                stats.n_unselected += int((~routing_map).sum())
        return record

    def summary(self) -> List[dict]:
        """Per MoE layer (dense layers have none), with its global index as "layer"."""
        return [{"layer": layer.layer_number - 1, **stats.as_dict()}
                for layer, stats in zip(self.layers, self.stats)]


def plot_analysis(summary: List[dict], output_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    load = torch.tensor([layer["load_fraction"] for layer in summary])
    figure, axis = plt.subplots(figsize=(1.2 + 0.5 * load.shape[1], 1.2 + 0.5 * load.shape[0]))
    image = axis.imshow(load.numpy(), cmap="viridis", aspect="auto")
    axis.set_yticks(range(len(summary)), [layer["layer"] for layer in summary])
    axis.set_xlabel("expert")
    axis.set_ylabel("layer")
    axis.set_title("share of routed tokens")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    written.append(os.path.join(output_dir, "expert_load.png"))
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)

    layers = [layer["layer"] for layer in summary]
    if all("cos_selection_vs_selected" in layer for layer in summary):
        figure, axis = plt.subplots(figsize=(6, 3.5))
        width = 0.4
        axis.bar([i - width / 2 for i in layers],
                 [layer["cos_selection_vs_selected"] for layer in summary], width,
                 label="selected experts")
        axis.bar([i + width / 2 for i in layers],
                 [layer["cos_selection_vs_unselected"] for layer in summary], width,
                 label="unselected experts")
        axis.set_xlabel("layer")
        axis.set_ylabel("mean cosine similarity")
        axis.set_title("selection embedding vs expert embeddings")
        axis.legend()
        figure.tight_layout()
        written.append(os.path.join(output_dir, "selection_similarity.png"))
        figure.savefig(written[-1], dpi=120)
        plt.close(figure)
    if all("side_over_experts_rms" in layer for layer in summary):
        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.bar(list(layers), [layer["side_over_experts_rms"] for layer in summary])
        axis.set_xlabel("layer")
        axis.set_ylabel("RMS(side path) / RMS(experts)")
        axis.set_title("HyperExpert contribution per layer")
        figure.tight_layout()
        written.append(os.path.join(output_dir, "hyper_contribution.png"))
        figure.savefig(written[-1], dpi=120)
        plt.close(figure)
    return written


def text_summary(summary: List[dict], moe_type: str, tokens: int) -> str:
    lines = [f"{moe_type} checkpoint, {len(summary)} MoE layers, {tokens:,} tokens analysed"]
    for layer in summary:
        line = f"layer {layer['layer']}: max/mean expert load {layer['max_over_mean_load']:.2f}"
        if "side_over_experts_rms" in layer:
            line += f", side/experts RMS {layer['side_over_experts_rms']:.3f}"
        if "cos_selection_vs_selected" in layer:
            line += (f", cos(selection, selected) {layer['cos_selection_vs_selected']:+.3f} vs "
                     f"unselected {layer['cos_selection_vs_unselected']:+.3f}")
        lines.append(line)
    return "\n".join(lines)


@torch.no_grad()
def analyze_model(loaded, inputs, json_keys=("text",), max_tokens: int = 20000):
    """Run a loaded checkpoint (:mod:`~megatron_hypermoe.inference.model_source`) over the first
    ``max_tokens`` tokens of ``inputs``; returns (per-layer summary, tokens, MoE layer class)."""
    ids, _ = corpus_ids(loaded, inputs, json_keys)
    ids = ids[:max_tokens + 1]
    analyzer = ExpertAnalyzer(loaded.model)
    if not analyzer.layers:
        raise CheckpointError(f"{loaded.source} is a dense model: it has no experts to analyse")
    score = megatron_token_nll(loaded.model)
    tokens = 0
    for window, targets in windows(ids, loaded.max_sequence_length):
        score(torch.tensor([window]), torch.tensor([targets]))
        tokens += len(window)
    return analyzer.summary(), tokens, type(analyzer.layers[0]).__name__


def write_analysis(summary: List[dict], tokens: int, moe_type: str, output_dir: str):
    """PNGs, summary.txt and analysis.json under output_dir; returns (summary text, files)."""
    os.makedirs(output_dir, exist_ok=True)
    written = plot_analysis(summary, output_dir)
    text = text_summary(summary, moe_type, tokens)
    with open(os.path.join(output_dir, "summary.txt"), "w") as handle:
        handle.write(text + "\n")
    with open(os.path.join(output_dir, "analysis.json"), "w") as handle:
        json.dump({"tokens": tokens, "layers": summary}, handle, indent=1)
    return text, written + ["summary.txt", "analysis.json"]
