"""Exports load and compute the same under transformers 4.x as under the pinned 5.x.

    make hf-compat     (installs transformers 4.57.1 into .cache/transformers4, runs this twice)

``python -m tests.hf_compat_check --make-exports DIR`` trains one-iteration dense, moe (top-2) and
hypermoe checkpoints, and those of :data:`EXPORTS` with the Qwen parts, on mock data and exports
them under DIR (one directory each, named as in EXPORTS). ``python -m tests.hf_compat_check
OUT.pt DIR...`` loads each HF directory with
whatever transformers is importable (our package hidden, as for a user who has only
transformers: a remote-code file that imported it would fail), and saves its logits on
:func:`record_ids` and greedy generation (KV cache) to OUT.pt; ``--compare A.pt B.pt`` checks
two such files agree (max abs logit difference 1e-5, identical tokens) and exits non-zero
otherwise. tests/test_hf_families.py runs the recording mode on the Qwen and HyperMoE exports.

``python tests/hf_compat_check.py --tokenize DIR...`` loads each directory's tokenizer with
``AutoTokenizer`` as a user with only ``pip install transformers`` would: with protobuf and our
package hidden, and prints one JSON line of its ids and decodings of TOKENIZER_TEXTS
(tests/test_hf_conversion.py compares them with the training tokenizer's).
"""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# export directory -> (variant, extra trainer flags): the three variants, moe models that export
# as Qwen2-MoE (gated shared expert, qkv bias, a dense layer) and Qwen3-MoE (q/k norm, a dense
# layer; head_dim stays hidden / heads: transformers 4 refuses another one in Qwen2-MoE only),
# and a HyperMoE with every optional part of its HF class.
QWEN2_FLAGS = ["--moe-shared-expert-intermediate-size", "32", "--moe-shared-expert-gate",
               "--add-qkv-bias", "--moe-layer-freq", "[1,0]", "--moe-ffn-hidden-size", "64"]
QWEN3_FLAGS = ["--qk-layernorm", "--kv-channels", "24", "--num-query-groups", "2",
               "--moe-layer-freq", "[0,1]", "--moe-ffn-hidden-size", "64"]
EXPORTS = {"dense": ("dense", []), "moe": ("moe", []), "hypermoe": ("hypermoe", []),
           "qwen2_moe": ("moe", QWEN2_FLAGS), "qwen3_moe": ("moe", QWEN3_FLAGS),
           "hypermoe_options": ("hypermoe", [*QWEN2_FLAGS, "--qk-layernorm", "--kv-channels",
                                             "24"])}


def make_exports(root):
    from tests.support.tiny_model import (
        tiny_run,  # not at the top: recording runs under transformers 4
    )

    tiny = ["--mock-data", "--vocab-size", "250", "--train-iters", "1"]
    environment = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for name, (moe_type, flags) in EXPORTS.items():
        checkpoint, export = os.path.join(root, f"{name}_ckpt"), os.path.join(root, name)
        if os.path.isdir(export):
            continue
        subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt_hypermoe.py"),
                        *tiny_run(moe_type), *tiny, *flags, "--save", checkpoint], check=True,
                       env=environment, capture_output=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint_to_hf.py"),
                        "--load", checkpoint, "--output", export], check=True, env=environment)


def record_ids():
    """The tokens :func:`record` scores."""
    return torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))


def hide_our_package():
    for name in HIDDEN_MODULES:
        sys.modules[name] = None  # importing it now fails, as if it were not installed
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") not in (here, ROOT)]


def record(out_path, directories):
    hide_our_package()
    import transformers
    from transformers import AutoModelForCausalLM

    ids = record_ids()
    results = {"version": transformers.__version__}
    for directory in directories:
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True,
                                                     torch_dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            tokens = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False,
                                    eos_token_id=None)[0, 5:]
        results[directory] = {"class": type(model).__name__, "logits": logits, "tokens": tokens}
        print(f"transformers {transformers.__version__}: {directory} -> {type(model).__name__}")
    torch.save(results, out_path)


def compare(path_a, path_b) -> int:
    a, b = torch.load(path_a), torch.load(path_b)
    failures = 0
    for directory in (k for k in a if k != "version"):
        difference = (a[directory]["logits"] - b[directory]["logits"]).abs().max().item()
        same_tokens = torch.equal(a[directory]["tokens"], b[directory]["tokens"])
        ok = difference <= 1e-5 and same_tokens and a[directory]["class"] == b[directory]["class"]
        failures += not ok
        print(f"{directory}: {a['version']} vs {b['version']}: max logit difference "
              f"{difference:.2e}, same greedy tokens {same_tokens} -> {'OK' if ok else 'FAIL'}")
    return 1 if failures else 0


# ASCII, unicode, runs of whitespace, digits, the empty text, leading spaces, a newline first,
# and special tokens spelt out
TOKENIZER_TEXTS = [
    "Hello, world. The quick brown fox jumps over the lazy dog!",
    "Größe über Straße — naïve café, Ælfric; 日本語のテキスト 😀",
    "a  b   c\t\td\n\n\n e  \n", "1234567890 3.14159 2024-01-01 0x1F", "", " ",
    "   leading spaces", "\nafter a newline", "trailing spaces   ",
    "literal </s> and <s> and <unk> and <|endoftext|>", "x\u200by \x00 \u2581meta\u2581",
]
HIDDEN_MODULES = ("google.protobuf", "megatron_hypermoe")


def tokenize(directories):
    """The --tokenize mode (see above)."""
    hide_our_package()
    import json

    from transformers import AutoTokenizer

    results = {}
    for directory in directories:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
        ids = [tokenizer.encode(text) for text in TOKENIZER_TEXTS]
        decoded = [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        results[directory] = {"ids": ids, "decoded": decoded,
                              "eos_token_id": tokenizer.eos_token_id,
                              "class": type(tokenizer).__name__}
    print(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1] == "--tokenize":
        sys.exit(tokenize(sys.argv[2:]))
    if sys.argv[1] == "--make-exports":
        sys.exit(make_exports(sys.argv[2]))
    if sys.argv[1] == "--compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    record(sys.argv[1], sys.argv[2:])
