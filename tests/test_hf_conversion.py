"""Hugging Face conversion both ways, evaluation and generation (issue: HF conversion).

Checkpoints come from real tiny training runs in several layouts. The strongest checks: the HF
model's logits equal our model's on the same tokens; an EP=2 or TP=2 checkpoint exports exactly
the same HF weights as a one-process one (so shards are gathered right); ours -> HF -> ours is
the identity.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from megatron_hypermoe.conversion.export import export_checkpoint
from megatron_hypermoe.errors import CheckpointError
from megatron_hypermoe.inference.model_source import build_megatron_model, load_hf_model
from megatron_hypermoe.training.checkpoint.reader import read_checkpoint
from tests.support.processes import pretrain, run_tool
from tests.support.tiny_model import (
    TINY,
    TINY_MODEL,
    hf_logits,
    megatron_logits,
    random_tokens,
    tiny_run,
)

pytestmark = [pytest.mark.usefixtures("megatron_single_process"), pytest.mark.slow]

# Trained weights: two steps at a large lr from the authors' normal-initialised heads, so that
# the HyperExpert measurably moves the logits (asserted in test_hf_logits_equal_megatron_logits)
# and the EP=2, TP=2 and PP=2 exports differ from the one-process export only by the rounding
# of their reductions.
TRAINED = ["--lr", "1e-2", "--min-lr", "1e-2", "--hyper-init", "normal", "--hyper-lr-mult", "1"]
RUNS = {
    "hypermoe": (TRAINED, 1),
    "hypermoe_ep2": ([*TRAINED, "--expert-model-parallel-size", "2"], 2),
    "hypermoe_tp2": ([*TRAINED, "--tensor-model-parallel-size", "2", "--sequence-parallel"], 2),
    "hypermoe_pp2": ([*TRAINED, "--pipeline-model-parallel-size", "2", "--zero-stage", "1"], 2),
    "moe": (["--moe-type", "moe"], 1),
    "dense": (["--moe-type", "dense"], 1),
    # top-1 with renormalised gates: a Mixtral (gate exactly 1)
    "moe_top1_renormalised": (["--moe-type", "moe", "--moe-router-topk", "1",
                               "--moe-router-renormalize"], 1),
    # the authors' GPT-2 setting: normal-initialised heads, top-1 gate of exactly 1, and the
    # generating weights' lr scaled by 1/d_g
    "hypermoe_authors": (["--moe-router-topk", "1", "--moe-router-renormalize",
                          "--hyper-init", "normal", "--hyper-lr-mult", "1/d_g"], 1),
}


def case(name):
    """A parametrize entry, marked multiprocess when its checkpoint needs several ranks."""
    return pytest.param(name, marks=pytest.mark.multiprocess) if RUNS[name][1] > 1 else name


@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):
    """checkpoint(name) -> a trained checkpoint directory (each run once per module)."""
    made = {}
    root = tmp_path_factory.mktemp("hf_checkpoints")

    def make(name):
        if name not in made:
            flags, nproc = RUNS[name]
            save = root / name
            moe_type = flags[flags.index("--moe-type") + 1] if "--moe-type" in flags \
                else "hypermoe"
            pretrain(*tiny_run(moe_type), *dataset, "--train-iters", "2",
                     "--global-batch-size", "4", *flags, "--save", str(save), nproc=nproc)
            made[name] = save
        return made[name]
    return make


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """exported(name) -> the HF directory converted from checkpoint(name)."""
    made = {}
    root = tmp_path_factory.mktemp("hf_exports")

    def make(name):
        if name not in made:
            made[name] = root / name
            export_checkpoint(str(checkpoint(name)), str(made[name]))
        return made[name]
    return make


def tokens(batch=2, length=32, seed=0):
    """Token ids of the trained checkpoints' vocabulary (the dataset fixture's 400)."""
    return random_tokens(batch, length, vocab=400, seed=seed)


def test_a_loaded_checkpoint_scores_the_same_on_a_gpu_node(checkpoint, monkeypatch):
    """The --load tools (evaluate, generate, analyze) on a machine with a GPU: megatron-core's
    layers went to the GPU and torch's modules (the hypernetwork, the selection embeddings, the
    RMSNorms) stayed on the host. With the GPU emulated (tests/emulated_accelerator.py), the
    checkpoint loads onto one device and scores every token as on the CPU."""
    from megatron_hypermoe.inference.evaluation import megatron_token_nll
    from tests.emulated_accelerator import DEVICE, devices_of, emulated_accelerator

    loaded = read_checkpoint(str(checkpoint("hypermoe")))
    ids = tokens(batch=1)
    targets = ids.roll(-1, dims=1)
    host, _ = build_megatron_model(loaded)
    with torch.no_grad():
        expected = megatron_token_nll(host)(ids, targets)
    with emulated_accelerator(monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node
        model, config = build_megatron_model(loaded)
        assert not config.use_cpu_initialization and devices_of(model) == {DEVICE}
        with torch.no_grad():
            nll = megatron_token_nll(model)(ids, targets).cpu()
    assert torch.allclose(nll, expected, rtol=1e-6, atol=1e-6)


ARCHITECTURES = {"hypermoe": "HyperMoeForCausalLM", "moe": "MixtralForCausalLM",
                 "dense": "LlamaForCausalLM"}


@pytest.mark.parametrize("name", [case(name) for name in RUNS])
def test_hf_logits_equal_megatron_logits(name, checkpoint, exported):
    megatron, _ = build_megatron_model(read_checkpoint(str(checkpoint(name))))
    hf = load_hf_model(str(exported(name)))
    assert type(hf).__name__ == ARCHITECTURES[name.split("_")[0]]
    ids = tokens()
    logits = megatron_logits(megatron, ids)
    difference = (hf_logits(hf, ids) - logits).abs().max().item()
    assert difference <= 1e-4, difference
    if name.startswith("hypermoe"):  # the HyperExpert's part is far above that tolerance
        with torch.no_grad():
            for head in ("down_weight", "down_bias", "up_weight", "up_bias"):
                for param in getattr(megatron.hypernetwork, head).parameters():
                    param.zero_()
        moved = (logits - megatron_logits(megatron, ids)).abs().max().item()
        assert moved >= 100 * 1e-4, moved


def test_the_authors_setting_travels_through_hf_and_back(checkpoint, exported, tmp_path):
    """--hyper-init, --hyper-lr-mult and the renormalised top-1 gate are recorded in the
    checkpoint, written to config.json, and read back by the importer."""
    recorded = read_checkpoint(str(checkpoint("hypermoe_authors"))).meta["args"]
    one_over_d_g = 1 / recorded["hyper_hidden_size"]  # the rule, resolved once (cli/)
    assert (recorded["hyper_init"], recorded["hyper_lr_mult"],
            recorded["moe_router_renormalize"]) == ("normal", one_over_d_g, True)
    config = json.loads((exported("hypermoe_authors") / "config.json").read_text())
    assert (config["hyper_init"], config["hyper_lr_mult"], config["norm_topk_prob"],
            config["num_experts_per_tok"]) == ("normal", one_over_d_g, True, 1)
    convert_back(exported("hypermoe_authors"), tmp_path / "back")
    back = read_checkpoint(str(tmp_path / "back")).run
    assert (back.model.hyper_init, back.optimizer.hyper_lr_mult,
            back.model.moe_router_renormalize) == ("normal", one_over_d_g, True)


def test_native_exports_have_no_custom_code_and_hypermoe_has_the_documented_keys(exported):
    for name in ("moe", "dense"):
        config = json.loads((exported(name) / "config.json").read_text())
        assert "auto_map" not in config and not list(exported(name).glob("*.py"))
    directory = exported("hypermoe")
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "hypermoe"
    assert config["architectures"] == ["HyperMoeForCausalLM"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    weights = load_file(str(directory / "model.safetensors"))
    d, r, d_g, d_e, d_p, d_h, d_l, experts, layers = (
        TINY[name] for name in ("hidden_size", "hyper_adapter_dim", "hyper_hidden_size",
                                "hyper_expert_embedding_dim", "hyper_selection_hidden_size",
                                "hyper_selection_output_size", "hyper_layer_embedding_dim",
                                "num_moe_experts", "num_layers"))
    ffn = TINY["ffn_hidden_size"]
    expected = {
        "model.layers.1.block_sparse_moe.selection.embedding.weight": [experts, d_e],
        "model.layers.1.block_sparse_moe.selection.fc1.weight": [d_p, d_e],
        "model.layers.1.block_sparse_moe.selection.fc1.bias": [d_p],
        "model.layers.1.block_sparse_moe.selection.fc2.weight": [d_h, d_p],
        "model.layers.1.block_sparse_moe.selection.fc2.bias": [d_h],
        "model.hypernet.layer_embedding.weight": [layers, d_l],
        "model.hypernet.fc.weight": [d_g, d_h + d_l], "model.hypernet.fc.bias": [d_g],
        "model.hypernet.down_weight.weight": [d * r, d_g], "model.hypernet.down_weight.bias":
        [d * r], "model.hypernet.down_bias.weight": [r, d_g],
        "model.hypernet.up_weight.weight": [r * d, d_g], "model.hypernet.up_bias.weight": [d, d_g],
        "model.layers.0.block_sparse_moe.experts.3.w1.weight": [ffn, d],
        "model.layers.0.block_sparse_moe.experts.3.w2.weight": [d, ffn],
        "model.layers.0.block_sparse_moe.gate.weight": [experts, d],
    }
    for key, shape in expected.items():
        assert list(weights[key].shape) == shape, key
    for field in ("hyper_adapter_dim", "hyper_hidden_size", "hyper_expert_embedding_dim",
                  "hyper_selection_hidden_size", "hyper_selection_output_size",
                  "hyper_layer_embedding_dim"):
        assert field in config


LAYOUT_TOLERANCE = 1e-4  # measured: see test_every_layout_exports_the_same_hf_weights


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["hypermoe_ep2", "hypermoe_tp2", "hypermoe_pp2"])
def test_every_layout_exports_the_same_hf_weights(layout, exported):
    """Trained in each layout from the same initial weights and batches: the same weights up to
    the rounding of the layouts' reductions."""
    one = load_file(str(exported("hypermoe") / "model.safetensors"))
    other = load_file(str(exported(layout) / "model.safetensors"))
    assert set(one) == set(other)
    worst = max(((one[key] - other[key]).abs().max().item(), key) for key in one)
    print(f"{layout}: largest difference {worst[0]:.3g} ({worst[1]})")
    assert worst[0] <= LAYOUT_TOLERANCE, worst


def convert_back(hf_dir, save, *flags, expect=0):
    result = run_tool("convert_hf_to_checkpoint.py", "--hf", hf_dir, "--save", save, *flags,
                      expect=expect)
    return result.stdout + result.stderr


@pytest.mark.parametrize("name", [case("hypermoe_ep2"), "moe", "dense"])
def test_ours_to_hf_to_ours_is_the_identity(name, checkpoint, exported, tmp_path):
    convert_back(exported(name), tmp_path / "back")
    original = read_checkpoint(str(checkpoint(name))).state
    back = read_checkpoint(str(tmp_path / "back")).state
    assert set(original) == set(back)
    for key in original:
        assert torch.equal(original[key], back[key]), key


def test_converted_checkpoint_trains_on(exported, dataset, tmp_path):
    convert_back(exported("hypermoe"), tmp_path / "back")
    output = pretrain(*TINY_MODEL, *dataset, "--train-iters", "1", "--load",
                      str(tmp_path / "back"), "--finetune")
    assert "iteration        1/       1" in output


@pytest.mark.parametrize("moe_type", ["moe", "moe_adapter", "hypermoe"])
def test_upcycled_dense_model_keeps_its_function(moe_type, exported, tmp_path):
    """E identical experts with renormalised top-2 weights compute the dense MLP exactly, and so
    does the static adapter (its up-projection starts at zero); the HyperExpert starts near
    zero, so HyperMoE is close but not equal."""
    convert_back(exported("dense"), tmp_path / "up", "--upcycle", "--moe-type", moe_type,
                 "--num-experts", "4", "--moe-router-topk", "2")
    checkpoint = read_checkpoint(str(tmp_path / "up"))
    assert checkpoint.meta["args"]["moe_type"] == moe_type
    upcycled, _ = build_megatron_model(checkpoint)
    dense = load_hf_model(str(exported("dense")))
    ids = tokens()
    reference = hf_logits(dense, ids)
    difference = (megatron_logits(upcycled, ids) - reference).abs().max().item()
    if moe_type in ("moe", "moe_adapter"):
        assert difference <= 1e-4
    else:
        assert 0 < difference <= 1e-2 * reference.abs().max().item()


def test_evaluate_gives_the_same_perplexity_for_both_forms(checkpoint, exported, corpus_file):
    corpus = corpus_file
    results = []
    for source in (["--load", str(checkpoint("hypermoe"))], ["--hf", str(exported("hypermoe"))]):
        output = run_tool("evaluate.py", *source, "--input", corpus, "--seq-length", "32",
                          "--word-level", "--json").stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    ours, hf = results
    assert ours["tokens"] == hf["tokens"] > 10_000
    assert abs(ours["ppl"] - hf["ppl"]) / ours["ppl"] < 1e-5
    assert abs(ours["word_ppl"] - hf["word_ppl"]) / ours["word_ppl"] < 1e-5
    assert ours["word_ppl"] > ours["ppl"]  # a word spans several tokens


def test_generation_agrees_across_forms_and_with_transformers_generate(checkpoint, exported):
    from megatron_hypermoe.inference.model_source import LoadedModel, as_megatron_callable
    from megatron_hypermoe.model.generation import generate_ids

    megatron, _ = build_megatron_model(read_checkpoint(str(checkpoint("hypermoe"))))
    hf = load_hf_model(str(exported("hypermoe")))
    prompt = tokens(batch=1, length=5, seed=4)[0].tolist()
    ours = generate_ids(megatron, prompt, 10, 32, greedy=True)
    via_hf = generate_ids(as_megatron_callable(LoadedModel("hf", hf, None, 32, 400)), prompt, 10,
                          32, greedy=True)
    with torch.no_grad():  # transformers' own loop, with the KV cache
        cached = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                             eos_token_id=None)[0, 5:].tolist()
    assert ours == via_hf == cached
    for source in (["--load", str(checkpoint("hypermoe"))], ["--hf", str(exported("hypermoe"))]):
        text = run_tool("generate.py", *source, "--prompt", "The", "--max-new-tokens", "8",
                        "--top-p", "0.9", "--seed", "3").stdout.strip()
        assert text.startswith("The") and len(text) > 3


TOKENIZER_KINDS = ["sentencepiece_bpe", "sentencepiece_unigram", "gpt2_bpe"]


@pytest.fixture(scope="module")
def tokenizer_directory(exported, dataset, tmp_path_factory):
    """tokenizer_directory(kind) -> a directory with the tokenizer files an export writes: the
    hypermoe export's own (the SentencePiece BPE of tools/train_tokenizer.py), or those that
    write_tokenizer_files writes for a unigram SentencePiece model or a GPT-2 byte-level BPE
    trained on the same corpus."""
    from megatron_hypermoe.data.tokenizer import TokenizerConfig, build_tokenizer
    from megatron_hypermoe.data.tokenizer_files import write_tokenizer_files

    corpus = dataset[dataset.index("--data-path") + 1].replace("ds_text_document",
                                                                "corpus.jsonl")
    made = {}
    root = tmp_path_factory.mktemp("hf_tokenizers")

    def make(kind):
        if kind == "sentencepiece_bpe":
            return exported("hypermoe")
        if kind not in made:
            if kind == "sentencepiece_unigram":
                from tools import train_tokenizer

                assert train_tokenizer.main(["--input", corpus, "--vocab-size", "350",
                                             "--model-type", "unigram",
                                             "--model-prefix", str(root / "unigram")]) == 0
                config = TokenizerConfig("SentencePieceTokenizer", str(root / "unigram.model"))
            else:
                from tokenizers import ByteLevelBPETokenizer

                bpe = ByteLevelBPETokenizer()
                bpe.train_from_iterator([json.loads(line)["text"] for line in open(corpus)],
                                        vocab_size=300, special_tokens=["<|endoftext|>"])
                bpe.save_model(str(root))
                config = TokenizerConfig("GPT2BPETokenizer", vocab_file=str(root / "vocab.json"),
                                         merge_file=str(root / "merges.txt"))
            made[kind] = root / kind
            made[kind].mkdir()
            write_tokenizer_files(config, build_tokenizer(config), str(made[kind]))
        return made[kind]
    return make


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_autotokenizer_of_the_export_matches_the_training_tokenizer(kind, tokenizer_directory,
                                                                    corpus_file):
    """The export's tokenizer.json encodes as the training tokenizer does, token for token
    (the whitespace runs, a leading space, unicode and the special tokens spelt out included),
    adds no BOS or EOS, decodes the same, and has its special tokens."""
    from transformers import AutoTokenizer

    from megatron_hypermoe.data.tokenizer_files import hf_directory_tokenizer
    from tests.hf_compat_check import TOKENIZER_TEXTS

    directory = tokenizer_directory(kind)
    assert (directory / "tokenizer.json").is_file()
    texts = TOKENIZER_TEXTS + [json.loads(line)["text"] for line in open(corpus_file)][:40]
    auto = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=True)
    _, ours = hf_directory_tokenizer(str(directory))
    assert type(auto).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
    assert auto.eos_token_id == ours.eod
    if kind.startswith("sentencepiece"):
        assert (auto.bos_token_id, auto.unk_token_id, auto.pad_token_id) == \
            (ours.bos, ours.unk, None) and ours.pad == -1
    # every text comes back whole, but for "▁" (SentencePiece's space) and a GPT-2 special token
    # spelt out (its id, which decoding drops)
    lossy = "<|endoftext|>" if kind == "gpt2_bpe" else "\u2581"
    for text in texts:
        ids = ours.tokenize(text)
        assert auto.encode(text) == ids, text
        assert auto.decode(ids, skip_special_tokens=True) == ours.detokenize(ids), text
        assert ours.detokenize(ids) == text or lossy in text, text


def test_the_export_tokenizer_loads_with_transformers_alone(tokenizer_directory, tmp_path):
    """AutoTokenizer loads every kind of export where protobuf and our package are not
    installed (pip install transformers sentencepiece brings no protobuf), to the same ids.
    With only tokenizer.model (and a LlamaTokenizer config), transformers had to convert the
    SentencePiece model, which needs protobuf, and failed with a tiktoken error."""
    import subprocess
    import sys

    from megatron_hypermoe.data.tokenizer_files import hf_directory_tokenizer
    from tests.hf_compat_check import TOKENIZER_TEXTS
    from tests.support.processes import REPO_ROOT

    directories = [str(tokenizer_directory(kind)) for kind in TOKENIZER_KINDS]
    environment = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                   "HF_MODULES_CACHE": str(tmp_path / "modules"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "hf_compat_check.py"),
                             "--tokenize", *directories], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for directory in directories:
        _, ours = hf_directory_tokenizer(directory)
        ids = [ours.tokenize(text) for text in TOKENIZER_TEXTS]
        assert loaded[directory]["ids"] == ids, directory
        assert loaded[directory]["decoded"] == [ours.detokenize(i) for i in ids], directory
        assert loaded[directory]["eos_token_id"] == ours.eod, directory


# Bad input: one-line errors, nothing written ------------------------------------------------------
@pytest.mark.multiprocess
def test_missing_expert_shard_is_refused_and_nothing_written(checkpoint, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint("hypermoe_ep2"), damaged)
    next((damaged / "iter_0000002").glob("experts_ep_rank_00001_*")).unlink()
    result = run_tool("convert_checkpoint_to_hf.py", "--load", str(damaged), "--output",
                      str(tmp_path / "out"), expect=1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "expert shard" in errors[0] and "is missing" in errors[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf-export-")]


@pytest.mark.parametrize("problem,message", [
    ("not_a_checkpoint", "is not a checkpoint directory"),
    ("tokenizer", "does not match the one the checkpoint was trained with"),
    ("moe_top1", "a top-1 megatron MoE with unrenormalised gates cannot be exported as "
                 "MixtralForCausalLM"),
    ("output_exists", "exists and is not empty"),
])
def test_export_refusals(problem, message, checkpoint, corpus_file, tmp_path):
    load, output, tokenizer_model = str(checkpoint("moe")), tmp_path / "out", None
    if problem == "not_a_checkpoint":
        load = str(tmp_path)
    elif problem == "tokenizer":  # a valid SentencePiece model, but another one
        from tools import train_tokenizer

        assert train_tokenizer.main(["--input", corpus_file, "--vocab-size", "450",
                                     "--model-prefix", str(tmp_path / "other")]) == 0
        tokenizer_model = str(tmp_path / "other.model")
        output = tmp_path / "out_dir"
    elif problem == "moe_top1":
        copy = tmp_path / "top1"
        shutil.copytree(load, copy)
        meta_path = copy / "iter_0000002" / "hypermoe_checkpoint.json"
        meta = json.loads(meta_path.read_text())
        # what a top-1 run records (its default routing: pre-softmax, not renormalised)
        meta["args"].update(moe_router_topk=1, moe_router_pre_softmax=True)
        meta_path.write_text(json.dumps(meta))
        load = str(copy)
    elif problem == "output_exists":
        output.mkdir()
        (output / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=message):
        export_checkpoint(load, str(output), tokenizer_model=tokenizer_model)
    assert not output.exists() or [p.name for p in output.iterdir()] == ["keep.txt"]


def test_import_refusals(exported, tmp_path):
    weightless = tmp_path / "weightless"
    shutil.copytree(exported("dense"), weightless)
    (weightless / "model.safetensors").unlink()
    output = convert_back(weightless, tmp_path / "a", expect=1)
    assert "has no *.safetensors weights" in output and not (tmp_path / "a").exists()
    output = convert_back(exported("moe"), tmp_path / "b", "--upcycle", "--moe-type", "moe",
                          expect=1)
    assert "--upcycle --moe-type moe adds nothing to a mixtral model" in output
    scaled = tmp_path / "scaled"
    shutil.copytree(exported("dense"), scaled)
    config = json.loads((scaled / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (scaled / "config.json").write_text(json.dumps(config))
    output = convert_back(scaled, tmp_path / "c", expect=1)
    assert "rope scaling" in output and not (tmp_path / "c").exists()
    output = convert_back(exported("dense"), tmp_path / "d", "--upcycle", "--moe-type", "moe",
                          "--num-experts", "4", "--hyper-hidden-size", "8", expect=1)
    assert "--hyper-hidden-size does not apply to --moe-type moe: drop it" in output, output
    assert not (tmp_path / "d").exists()
    from megatron_hypermoe.cli.arguments import run_config_for_model
    from megatron_hypermoe.conversion.import_hf import import_hf
    from megatron_hypermoe.errors import ArgumentError

    for moe_type, fields, lr_mult, flag in (("moe_adapter", {"hyper_init": "normal"}, None,
                                             "--hyper-init"),
                                            ("moe", {}, 1.0, "--hyper-lr-mult")):
        with pytest.raises(ArgumentError, match=f"{flag} does not apply to --moe-type {moe_type}"):
            import_hf(str(exported("dense")), str(tmp_path / "e"), upcycle=True,
                      moe_type=moe_type, upcycle_fields=fields, hyper_lr_mult=lr_mult,
                      run_config_for_model=run_config_for_model)
        assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_rope_theta_and_rms_norm_eps_round_trip(name, exported, tmp_path):
    """A Llama/Mixtral with another RoPE base and norm epsilon imports to a model that computes
    the same logits, and exports back to the same two values."""
    changed = tmp_path / "changed"
    shutil.copytree(exported(name), changed)
    config = json.loads((changed / "config.json").read_text())
    config.update(rope_theta=500000.0, rms_norm_eps=1e-3)
    (changed / "config.json").write_text(json.dumps(config))
    convert_back(changed, tmp_path / "ours")
    checkpoint = read_checkpoint(str(tmp_path / "ours"))
    assert (checkpoint.run.model.rotary_base, checkpoint.run.model.layernorm_epsilon) == \
        (500000.0, 1e-3)
    ids = tokens()
    ours = megatron_logits(build_megatron_model(checkpoint)[0], ids)
    theirs = hf_logits(load_hf_model(str(changed)), ids)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - hf_logits(load_hf_model(str(exported(name))), ids)).abs().max() > 1e-3
    export_checkpoint(str(tmp_path / "ours"), str(tmp_path / "again"))
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (again["rope_theta"], again["rms_norm_eps"]) == (500000.0, 1e-3)
