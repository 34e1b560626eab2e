#!/usr/bin/env python
"""Tokenize a corpus into megatron-core indexed datasets (Megatron-LM's tools/preprocess_data.py).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod

Writes PREFIX_<key>_document.bin/.idx plus a .tokenizer.json sidecar; see
``megatron_hypermoe/data/preprocess.py``.
"""

import argparse
import sys

from megatron_hypermoe.cli.data_flags import add_tokenizer_args, tokenizer_config
from megatron_hypermoe.data.corpus import TEXT_SAMPLE_BY
from megatron_hypermoe.data.preprocess import PreprocessJob, preprocess
from megatron_hypermoe.errors import exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Tokenize a corpus into megatron-core indexed datasets.")
    group = parser.add_argument_group("input")
    group.add_argument("--input", nargs="+", required=True,
                       help="files, globs or directories (jsonl, json, parquet, csv, txt), or a "
                            "Hugging Face dataset name when the hub is reachable")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="fields to tokenize; one output dataset per key")
    group.add_argument("--text-sample-by", choices=TEXT_SAMPLE_BY, default="document",
                       help="what one document is in a plain-text file")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip malformed JSON lines and count them instead of failing")
    add_tokenizer_args(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True)
    group.add_argument("--append-eod", action="store_true",
                       help="append the end-of-document token to every document")
    group.add_argument("--overwrite", action="store_true",
                       help="replace an existing dataset with the same prefix")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1)
    group.add_argument("--log-interval", type=int, default=1000,
                       help="documents between progress log lines when stderr is not a tty")
    return parser


@exit_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = preprocess(PreprocessJob(
            input=tuple(args.input), output_prefix=args.output_prefix,
            tokenizer=tokenizer_config(args), json_keys=tuple(args.json_keys),
            text_sample_by=args.text_sample_by, skip_bad_lines=args.skip_bad_lines,
            append_eod=args.append_eod, overwrite=args.overwrite, workers=args.workers,
            log_interval=args.log_interval))
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 130
    for key, prefix in zip(args.json_keys, summary["outputs"]):
        print(f"wrote {summary['written'][key]:,} documents ({summary['dtype']}) to "
              f"{prefix}.bin/.idx; skipped {summary['empty_documents'][key]:,} empty")
    print(f"{summary['tokens']:,} tokens in {summary['seconds']:.1f} s "
          f"({summary['tokens'] / max(summary['seconds'], 1e-9):,.0f} tokens/s)")
    if summary["skipped_bad_lines"]:
        print(f"skipped {summary['skipped_bad_lines']:,} malformed lines (--skip-bad-lines), "
              f"e.g. {', '.join(summary['bad_line_examples'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
