"""Write the token lengths of a dataset's training examples, for `--lengths` of bench/bench.py and
bench/peer_hf_peft.py: both then train on batches of the real lengths (random token ids: speed
does not depend on them), and their tokens/s count the same work.

    python bench/alpaca_lengths.py --checkpoint SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data alpaca_data_1k.json --out bench/alpaca_1k_smollm2_lengths.json

The examples are the ones train_sft.py trains on with the same flags: the checkpoint's tokenizer
and chat template (--template auto), --seq-len 512, the 5% validation split of seed 42 left out.
Each is [tokens, prompt, answer]: labels[prompt:prompt + answer] are trained on, the rest are
masked (the prompt before, and what the template writes after the answer's end token).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script, from anywhere

import data  # noqa: E402
from config import TrainConfig  # noqa: E402
from errors import ArgumentParser, UserError, run_cli  # noqa: E402
from model import IGNORE_INDEX  # noqa: E402
from records import load_records, split_train_val  # noqa: E402
from tokenizer import checkpoint_tokenizer  # noqa: E402


def prompt_and_answer(labels: list[int]) -> list[int]:
    """[masked tokens before the answer, answer tokens] of a single-turn example."""
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if trained[-1] - trained[0] + 1 != len(trained):
        raise UserError("a multi-turn example: --lengths describes one prompt and one answer")
    return [trained[0], len(trained)]


def main(argv=None):
    d = TrainConfig()
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="the model whose tokenizer and template")
    p.add_argument("--data", required=True, help="Alpaca or chat records, JSON or JSONL")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="train_sft.py's --seq-len")
    a = p.parse_args(argv)
    tokenizer = checkpoint_tokenizer(a.checkpoint)
    template = data.resolve_template("auto", tokenizer, say=lambda line: None)
    train, _ = split_train_val(load_records(a.data), d.val_split, seed=d.seed)
    examples, _ = data.encode_dataset(train, tokenizer, template, a.seq_len, progress=False)
    lengths = [[len(ids), *prompt_and_answer(labels)] for ids, labels in examples]
    Path(a.out).write_text(json.dumps({
        "source": f"{Path(a.data).name}, {Path(a.checkpoint).name}'s tokenizer and chat template, "
                  f"--seq-len {a.seq_len}, the training split of train_sft.py's defaults "
                  f"(val_split {d.val_split}, seed {d.seed}); written by bench/alpaca_lengths.py",
        "vocab_size": tokenizer.vocab_size,
        "examples": lengths,
    }, separators=(",", ":")) + "\n")
    print(f"{a.out}: {len(lengths)} examples, {sum(n for n, _, _ in lengths)} tokens")


if __name__ == "__main__":
    run_cli(main)
