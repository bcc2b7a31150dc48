"""Several data sources in one run: --data repeated, each with an optional weight.

    python train_sft.py --data alpaca.json --data sharegpt.parquet:0.3    # 30% from the parquet

What a weight means. An epoch holds N examples, N = the training examples of all sources together,
so that without weights an epoch is every example once, as with one file. A source's weight w, in
(0, 1], is the share of every epoch drawn from it: w·N examples (rounded so that the counts add up
to N). Sources without a weight share what the weights leave, 1 − Σw, in proportion to their
sizes; when every source has one, the weights must add up to 1. A source asked for fewer examples
than it has gives another sample each epoch (drawn without replacement, so a large source is seen
further over the epochs); one asked for more gives every example ⌊n/size⌋ times and a sample of
the rest. An epoch's sample depends only on --seed and the epoch: a resumed run draws the same.

--val-split holds out that fraction of each source (before any weighting), so the validation loss
weighs the sources by their sizes; --val-data replaces it with one file.
"""
import math
import random
from dataclasses import dataclass

import data
from errors import UserError
from records import load_records, parse_columns, parse_source, split_train_val


def check_weights(weights: list, names: list[str]):
    """The weights must be shares of an epoch: at most 1 in all, exactly 1 when every source has
    one, less than 1 when some source has none (it takes the rest)."""
    given = sum(weight for weight in weights if weight is not None)
    if given > 1 + 1e-9:
        raise UserError(f"the --data weights add up to {given:g}, over 1: each is the share of "
                        "every epoch drawn from its file")
    if None not in weights and abs(given - 1) > 1e-9:
        raise UserError(f"the --data weights add up to {given:g}; when every file has one they "
                        "must add up to 1 (leave one without a weight to take the rest)")
    if None in weights and given > 1 - 1e-9:
        unweighted = [name for name, weight in zip(names, weights) if weight is None]
        raise UserError(f"the --data weights add up to 1, which leaves nothing for "
                        f"{', '.join(unweighted)}")


def source_counts(sizes: list[int], weights: list, names: list[str]) -> list[int]:
    """How many examples each source gives every epoch (see the top of this file)."""
    check_weights(weights, names)
    total = sum(sizes)
    given = sum(weight for weight in weights if weight is not None)
    rest = [size for size, weight in zip(sizes, weights) if weight is None]
    shares = [(1 - given) * size / sum(rest) if weight is None else weight
              for size, weight in zip(sizes, weights)]
    # largest remainder: the floors, then one more for the largest fractional parts, so Σ = total
    exact = [share * total for share in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class Mix:
    """The training examples of every source, and how many each gives every epoch."""
    sources: list[list]   # the encoded examples of each source
    counts: list[int]     # source_counts
    seed: int

    def epoch(self, epoch: int) -> list:
        """The examples of one epoch, in source order (make_batches shuffles them)."""
        if self.counts == [len(examples) for examples in self.sources]:
            return [example for examples in self.sources for example in examples]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        chosen = []
        for examples, count in zip(self.sources, self.counts):
            whole, rest = divmod(count, len(examples))
            chosen += examples * whole
            chosen += [examples[i] for i in sorted(rng.sample(range(len(examples)), rest))]
        return chosen


@dataclass
class LoadedData:
    """What load_sources read: the mix, the validation records and examples, what config.json
    says of each source, and the encoding's counts (records, kept, truncated, dropped)."""
    mix: Mix
    train_records: list
    val_records: list
    val_examples: list
    described: list[dict]
    stats: dict


def load_sources(config, tokenizer, template, say) -> LoadedData:
    """Read, split and encode every --data source (and --val-data) of a run's config."""
    columns = parse_columns(config.columns) if config.columns else None
    encode = dict(tokenizer=tokenizer, template=template, max_seq_len=config.seq_len,
                  train_on_prompt=config.train_on_prompt, train_on=config.train_on)
    sources, weights, names, described, train_records, val_records = [], [], [], [], [], []
    stats = dict.fromkeys(("records", "kept", "truncated", "dropped"), 0)
    for text in config.data:
        path, weight = parse_source(text)
        records = load_records(path, columns, say=say)
        train, val = records, []
        if not config.val_data:
            train, val = split_train_val(records, config.val_split, seed=config.seed)
        examples, counted = data.encode_dataset(train, source=path, **encode)
        sources.append(examples)
        weights.append(weight)
        names.append(path)
        train_records += train
        val_records += val
        stats = {key: value + counted[key] for key, value in stats.items()}
        described.append({"data": text, "records": len(records), "train": len(train),
                          "validation": len(val), "examples": len(examples)})
    counts = source_counts([len(examples) for examples in sources], weights, names)
    for row, count in zip(described, counts):
        row["per_epoch"] = count
    if len(sources) > 1:
        say("mix per epoch: " + ", ".join(f"{count} from {name}"
                                          for count, name in zip(counts, names)))
    if config.val_data:
        val_records = load_records(config.val_data, columns, say=say)
    val_examples = []
    if val_records:
        val_examples, _ = data.encode_dataset(val_records, source=config.val_data or "--data",
                                              **encode)
    return LoadedData(Mix(sources, counts, config.seed), train_records, val_records,
                        val_examples, described, stats)
