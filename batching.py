"""Encoded examples → batches: padded and grouped by length, or packed with document masks.

    [(input_ids, labels), ...]
      ─► make_batches ─► [{"tokens", "labels", "positions", "doc_ids", "lengths"}, ...]

Padding wastes compute on tokens that are not there; grouping examples of similar length wastes
less, and packing several examples into each row wastes almost none, at the price of a
block-diagonal attention mask (model.Transformer.hidden_states builds it from doc_ids).
"""
import bisect
import math
import random

import torch

from model import IGNORE_INDEX


def make_batches(examples: list, batch_size: int, *, pad_id: int, max_seq_len: int,
                 packing: bool = False, group_by_length: bool = True, shuffle: bool = True,
                 seed: int = 0, epoch: int = 0, pad_to_multiple_of: int = 1) -> list[dict]:
    """One epoch of batches, the same for the same (seed, epoch), so a run resumes by batch index.

    Padding (default): each example is a row, right-padded to the longest in its batch. Causal
    attention never looks right, so padding needs no attention mask, only IGNORE_INDEX labels.
    group_by_length (Hugging Face's trick) puts similar lengths together: shuffle, cut into chunks
    of 50 batches, sort each chunk by length, cut into batches, shuffle the batches.
    packing: examples share rows of up to max_seq_len tokens (batch_size rows per batch);
    `doc_ids` keep each example's attention to itself and `positions` restart at 0 for each.
    pad_to_multiple_of: each batch's width rounded up to a multiple of it (at most max_seq_len),
    so that batches come in a few widths: a compiled step or a CUDA graph recorded for a width is
    reused by every batch of that width (speed/cuda_graphs.py). The extra positions are padding,
    masked like the rest: the loss is the same.
    Every batch also has "lengths": the real (non-padding) tokens of each row.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    lengths = [len(ids) for ids, _ in examples]
    if lengths and max(lengths) > max_seq_len:
        raise ValueError(f"an example has {max(lengths)} tokens, over max_seq_len={max_seq_len}")
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    if packing:
        rows = pack_rows(order, lengths, max_seq_len)
        if shuffle:
            rng.shuffle(rows)
    else:
        if group_by_length:
            chunk = 50 * batch_size
            order = [index for start in range(0, len(order), chunk)
                     for index in sorted(order[start:start + chunk], key=lambda i: -lengths[i])]
        rows = [[index] for index in order]
    groups = [rows[start:start + batch_size] for start in range(0, len(rows), batch_size)]
    if shuffle and group_by_length and not packing:
        rng.shuffle(groups)
        longest = max(range(len(groups)), key=lambda g: lengths[groups[g][0][0]])
        # the longest batch first: running out of memory shows at step 1
        groups.insert(0, groups.pop(longest))
    batches = []
    for group in groups:
        example_rows = [[examples[index] for index in row] for row in group]
        batches.append(collate(example_rows, pad_id, packed=packing,
                               width=padded_width(example_rows, pad_to_multiple_of, max_seq_len)))
    return batches


def pack_rows(order: list[int], lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: longest first, each into the row it fills most tightly.
    Rows are lists of example indices; ties keep `order` (the shuffle)."""
    rows, free = [], []  # free: sorted (space left, row) of rows that have room
    for i in sorted(order, key=lambda i: -lengths[i]):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = max_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if space > lengths[i]:
            bisect.insort(free, (space - lengths[i], r))
    return rows


def padded_width(rows: list[list[tuple]], multiple: int, max_width: int) -> int:
    """The longest row's tokens, rounded up to a multiple of `multiple` but not past max_width."""
    longest = max(sum(len(ids) for ids, _ in row) for row in rows)
    return min(-(-longest // multiple) * multiple, max_width)  # (longest <= max_width)


def collate(rows: list[list[tuple]], pad_id: int, packed: bool, width: int | None = None) -> dict:
    """Rows of (input_ids, labels) examples → tensors `width` wide (default: the longest row),
    padded. Packed: positions restart and doc ids count up per example; the padding is a document
    of its own, so it never attends into real tokens."""
    width = width or max(sum(len(ids) for ids, _ in row) for row in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    positions, doc_ids = torch.zeros_like(tokens), torch.zeros_like(tokens)
    real = []
    for r, row in enumerate(rows):
        start = 0
        for doc, (ids, labs) in enumerate(row):
            end = start + len(ids)
            tokens[r, start:end], labels[r, start:end] = torch.tensor(ids), torch.tensor(labs)
            positions[r, start:end], doc_ids[r, start:end] = torch.arange(len(ids)), doc
            start = end
        positions[r, start:], doc_ids[r, start:] = torch.arange(width - start), len(row)
        real.append(start)
    return {"tokens": tokens, "labels": labels, "positions": positions if packed else None,
            "doc_ids": doc_ids if packed else None, "lengths": torch.tensor(real)}


def batch_efficiency(batches: list[dict]) -> float:
    """Share of the batch tensors' positions holding real tokens rather than padding."""
    real_tokens = sum(int(batch["lengths"].sum()) for batch in batches)
    positions = sum(batch["tokens"].numel() for batch in batches)
    return real_tokens / max(1, positions)


class StepBatches:
    """The micro-batches of every optimizer step, as a pure function of the step number.

    Each epoch's batches are make_batches(examples_of(epoch), ..., seed, epoch), and micro-batch i
    of the run is the one at its place in that sequence of epochs: the same step always gets the
    same data, so a run resumed at step k continues exactly where it stopped. examples_of is
    sources.Mix.epoch: the same examples every epoch, or (mixed with weights) each epoch's own
    sample, whose packed rows may then number a few more or fewer than epoch 0's. The run lasts
    `max_steps` optimizer steps, or (None) as many as `epochs` passes over the data take (counted
    in epoch 0's micro-batches)."""

    def __init__(self, examples_of, batch_size: int, per_step: int, epochs: float = 1.0,
                 max_steps: int | None = None, **options):
        self.examples_of = examples_of
        self.batch_size = batch_size
        self.per_step = per_step
        self.options = options
        self.epoch = 0
        self.batches = make_batches(examples_of(0), batch_size, epoch=0, **options)
        self.per_epoch = len(self.batches)  # (epoch 0's: what --epochs counts in)
        self.starts = [0, self.per_epoch]  # where each epoch counted so far starts, and the end
        # the widest batch: every epoch has the longest example, so the same width (a weighted
        # mix may leave it out of epoch 0: then an estimate)
        self.longest = max(batch["tokens"].shape[1] for batch in self.batches)
        self.total_steps = max_steps or max(1, math.ceil(epochs * self.per_epoch / per_step))

    def for_step(self, step: int) -> list[dict]:
        first = step * self.per_step
        return [self.micro_batch(i) for i in range(first, first + self.per_step)]

    def micro_batch(self, i: int) -> dict:
        while i >= self.starts[-1]:  # count the batches of the epochs up to i's
            examples = self.examples_of(len(self.starts) - 1)
            self.starts.append(self.starts[-1] + batch_count(examples, self.batch_size,
                                                             **self.options))
        epoch = bisect.bisect_right(self.starts, i) - 1
        if epoch != self.epoch:  # a new epoch: its own shuffle (only one epoch is kept in memory)
            self.epoch = epoch
            self.batches = make_batches(self.examples_of(epoch), self.batch_size, epoch=epoch,
                                        **self.options)
        return self.batches[i - self.starts[epoch]]


def batch_count(examples: list, batch_size: int, *, max_seq_len: int, packing: bool = False,
                **options) -> int:
    """How many batches make_batches makes of `examples`, without making them."""
    rows = len(examples)
    if packing:
        lengths = [len(ids) for ids, _ in examples]
        rows = len(pack_rows(list(range(len(examples))), lengths, max_seq_len))
    return math.ceil(rows / batch_size)
