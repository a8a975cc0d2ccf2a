"""Derive QEfficient's op vocabulary from the shared fixture corpus into the checked-in list.

    python scripts/op_vocabulary.py [--corpus ../shared/fixtures/qeff] [--check]

Every ``domain::op_type`` used in the main graph or a function body of ``<corpus>/*/model.onnx``
goes to ``paged_rewrite/custom_ops/qeff_op_vocabulary.txt``; the paged ops' bodies may use only
those (the QAIC compiler accepts every op of QEfficient's own exports). ``--check`` compares
instead of writing and exits 1 on a difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paged_rewrite.custom_ops.vocabulary import VOCABULARY_FILE, corpus_models, derive

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "fixtures" / "qeff")
    parser.add_argument("--check", action="store_true", help="compare with the checked-in list")
    args = parser.parse_args()
    models = corpus_models(args.corpus)
    if not models:
        print(f"no {args.corpus}/*/model.onnx", file=sys.stderr)
        return 2
    text = derive(models)
    if args.check:
        same = VOCABULARY_FILE.read_text() == text
        print(f"{VOCABULARY_FILE}: {'up to date' if same else 'differs from the corpus'}")
        return 0 if same else 1
    VOCABULARY_FILE.write_text(text)
    print(f"wrote {VOCABULARY_FILE}: {len(text.splitlines()) - 3} ops from {len(models)} exports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
