"""benchmarks/compare_variants.py --quick and tools/analyze_experts.py on tiny runs."""

import json
import subprocess
import sys

import pytest
import torch

from tests.support.processes import REPO_ROOT, environment, pretrain
from tests.support.tiny_model import tiny_run

pytestmark = pytest.mark.slow


def run(*command):
    result = subprocess.run([sys.executable, *map(str, command)], env=environment(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


def test_quick_comparison_writes_report_and_plot_with_every_variant(dataset, tmp_path):
    data_path = dataset[dataset.index("--data-path") + 1]
    tokenizer = dataset[dataset.index("--tokenizer-model") + 1]
    results = tmp_path / "docs" / "RESULTS.md"
    output = run(REPO_ROOT / "benchmarks" / "compare_variants.py", "--quick", "--seeds", "1",
                 "--train-iters", "20", "--data-path", data_path, "--tokenizer-model",
                 tokenizer, "--work-dir", tmp_path / "work", "--results", results, "--json")
    summary = json.loads(output.strip().splitlines()[-1])
    assert set(summary) == {"hypermoe", "moe", "moe_adapter", "dense"}
    report = results.read_text()
    for variant in summary:
        assert f"| {variant} |" in report
        assert summary[variant]["ppl_mean"] > 1
    assert "python benchmarks/compare_variants.py --quick" in report and "CPU cores" in report
    assert summary["moe"]["ppl_minus_moe_mean"] == 0
    assert summary["hypermoe"]["ppl_minus_moe_mean"] == pytest.approx(
        summary["hypermoe"]["ppl_mean"] - summary["moe"]["ppl_mean"])  # one seed: the same
    # dense is sized to the experts' active parameters; the adapter adds L x (2dr + r + d)
    assert summary["dense"]["active_params"] <= summary["moe"]["active_params"] * 1.05
    assert summary["moe_adapter"]["total_params"] > summary["moe"]["total_params"]
    png = results.with_suffix(".png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_upcycled_comparison_starts_every_variant_from_the_dense_source(dataset, tmp_path):
    """--upcycle-from-dense: the sparse variant's experts are copies of the trained dense MLP,
    and its second phase continues from there (lower perplexity than the source reached)."""
    from megatron_hypermoe.training.checkpoint.reader import read_checkpoint

    data_path = dataset[dataset.index("--data-path") + 1]
    tokenizer = dataset[dataset.index("--tokenizer-model") + 1]
    work, results = tmp_path / "work", tmp_path / "R.md"
    run(REPO_ROOT / "benchmarks" / "compare_variants.py", "--quick", "--seeds", "1",
        "--train-iters", "20", "--upcycle-from-dense", "20", "--variants", "hypermoe", "dense",
        "--data-path", data_path, "--tokenizer-model", tokenizer, "--work-dir", work,
        "--results", results)
    assert "Upcycled: each seed first trains a dense model" in results.read_text()
    source = read_checkpoint(str(work / "dense_source_seed1234" / "checkpoint")).state
    upcycled = read_checkpoint(str(work / "upcycled_hypermoe_seed1234")).state
    for layer in range(2):
        dense_fc1 = source[f"decoder.layers.{layer}.mlp.linear_fc1.weight"]
        for expert in range(4):
            assert torch.equal(upcycled[f"decoder.layers.{layer}.mlp.experts.local_experts."
                                        f"{expert}.linear_fc1.weight"], dense_fc1)

    def validation_ppl(run_dir):
        rows = [json.loads(line) for line in open(work / run_dir / "metrics.jsonl")]
        return [row["val_ppl"] for row in rows if "val_ppl" in row]

    # 10 iterations into the second phase already beat the source's 20: it started from there
    source_ppl = validation_ppl("dense_source_seed1234")
    for variant in ("hypermoe", "dense"):
        assert validation_ppl(f"{variant}_seed1234")[0] < source_ppl[-1]


@pytest.mark.parametrize("moe_type,pngs", [
    ("hypermoe", {"expert_load.png", "selection_similarity.png", "hyper_contribution.png"}),
    ("moe", {"expert_load.png"}),
])
def test_analyze_experts_writes_its_plots_and_summary(moe_type, pngs, dataset, tmp_path):
    pretrain(*tiny_run(moe_type), *dataset, "--train-iters", "3",
             "--save", str(tmp_path / "ckpt"))
    corpus = dataset[dataset.index("--data-path") + 1].replace("ds_text_document",
                                                               "corpus.jsonl")
    output = run(REPO_ROOT / "tools" / "analyze_experts.py", tmp_path / "ckpt", "--input",
                 corpus, "--max-tokens", "2000", "--output-dir", tmp_path / "analysis")
    written = {p.name for p in (tmp_path / "analysis").iterdir()}
    assert pngs | {"summary.txt", "analysis.json"} == written
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert analysis["tokens"] == 2000 and len(analysis["layers"]) == 2
    for layer in analysis["layers"]:
        assert abs(sum(layer["load_fraction"]) - 1) < 1e-9
        if moe_type == "hypermoe":
            assert 0 < layer["side_over_experts_rms"] < 100
            assert -1 <= layer["cos_selection_vs_selected"] <= 1
    assert "layer 1: max/mean expert load" in output


@pytest.mark.parametrize("flags,message", [
    (["--finetune-from-moe", "10", "--variants", "moe", "dense"], "drop dense"),
    (["--finetune-from-moe", "10", "--upcycle-from-dense", "10"], "without --upcycle-from-dense"),
    (["--pretrain-corpus", "wikipedia"], "goes with --finetune-from-moe"),
])
def test_finetune_from_moe_refusals(flags, message, capsys):
    """--finetune-from-moe starts every variant from the pretrained MoE (the study itself runs
    for an hour: docs/RESULTS_finetune_from_moe.md)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "compare_variants", REPO_ROOT / "benchmarks" / "compare_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.parse_args(flags)
    assert message in capsys.readouterr().err
    args = module.parse_args(["--finetune-from-moe", "10", "--corpus", "wikipedia"])
    assert args.pretrain_corpus == "shakespeare"
