"""CUDA graphs for the training step of a small model: record a micro-batch once, replay it.

SmolLM2-135M on a batch of Alpaca examples gives each kernel a few microseconds of work, and
eager PyTorch launches thousands of kernels a micro-batch (30 layers of norms, projections,
LoRA adapters and attention, forward and backward), each taking the CPU longer to launch than the
GPU to run. The GPU waits for the CPU. A CUDA graph records every kernel of one micro-batch's
forward and backward pass once, with its arguments, and then replays them all with one launch.

A graph replays the same memory with the same shapes, so:
- each batch shape gets its own graph: batching's pad_to_multiple_of keeps the widths few;
- the batch is copied into the graph's own input tensors before each replay, and the divisor of
  the loss (the step's target count, train_sft.train_step) is one of them;
- the gradients are tensors that live across steps: each replay adds into them, as backward
  does, and the optimizer step zeroes them in place (`zero_grad(set_to_none=False)`).
The first micro-batch of each shape runs eagerly (it warms up what is set up lazily: cuBLAS,
compiled code) and counts like any other; the graph is recorded after it. Should recording
fail (an operation PyTorch cannot record), a note says so and the steps run eagerly from then on.

Recording needs a step that never waits for the CPU inside it and never copies from CPU memory:
train_sft.batch_loss as it is (LoRA or full fine-tuning, bf16 or fp32, compiled or not), but not
QLoRA's embedding in CPU memory, fp16's loss scaling, activation checkpointing or torchrun
(use_cuda_graphs says why when it declines). Dropout works: the graph advances the random
generator at each replay.
"""
import os
import sys

import torch

INPUTS = ("tokens", "labels", "positions", "doc_ids")


def cuda_graphs_refusal(config) -> str | None:
    """Why train_sft's settings cannot run with CUDA graphs, or None when they can."""
    if not config.device.startswith("cuda"):
        return "a GPU"
    if config.method == "qlora":
        return "--method lora or full (QLoRA's embedding stays in CPU memory)"
    if config.precision == "fp16":
        return "--precision bf16 or fp32 (fp16's loss scaling skips steps on the CPU's word)"
    if config.grad_ckpt:
        return "no --grad-ckpt"
    if config.fp8:  # (not yet measured together: FP8's per-row scales inside a recorded graph)
        return "no --fp8"
    if config.world_size > 1 or "RANK" in os.environ:  # (torchrun sets RANK: start_distributed)
        return "one process (not torchrun)"
    return None


class GraphedMicroSteps:
    """model.cuda_graphs: run(batch, n_targets) does what train_step's loop body does for one
    micro-batch (loss_fn(model, batch) / n_targets, backward) through the batch shape's graph."""

    def __init__(self, model, loss_fn):
        self.model = model
        self.loss_fn = loss_fn  # (model, batch of device tensors) -> Σ loss over its targets
        self.params = [p for p in model.parameters() if p.requires_grad]
        for p in self.params:  # the gradients every graph adds into
            p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]
        self.device = self.params[0].device
        self.pool = None  # one memory pool for every graph (they never run at once), made lazily
        self.recorded = {}  # batch shape -> Recorded
        self.failed = None  # why recording failed, if it did: then every step runs eagerly

    def run(self, batch: dict, n_targets: int) -> torch.Tensor:
        """The micro-batch's share of the loss, detached. With a graph it is the graph's own
        output tensor, overwritten by the next replay: add it up before then (train_step does)."""
        if any(p.grad is not g for p, g in zip(self.params, self.grads)):
            raise RuntimeError("CUDA graphs add into the same gradient tensors at every step: "
                               "zero them in place (zero_grad(set_to_none=False))")
        if self.failed:
            inputs = {k: None if batch.get(k) is None else batch[k].to(self.device)
                      for k in INPUTS}
            return self.micro_step(inputs, max(n_targets, 1))
        shape = (tuple(batch["tokens"].shape), batch["doc_ids"] is not None)
        recorded = self.recorded.get(shape)
        if recorded is None:
            recorded = self.recorded[shape] = Recorded(self, batch)
            return recorded.warm_up_and_record(n_targets)
        recorded.load(batch, n_targets)
        recorded.graph.replay()
        return recorded.loss

    def micro_step(self, inputs: dict, divisor: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(self.model, inputs) / divisor
        loss.backward()  # adds into p.grad
        return loss.detach()


class Recorded:
    """One batch shape's graph and the tensors it reads (inputs, divisor) and writes (loss)."""

    def __init__(self, steps: GraphedMicroSteps, batch: dict):
        self.steps = steps
        device = steps.device
        self.inputs = {k: None if batch.get(k) is None else batch[k].to(device) for k in INPUTS}
        self.divisor = torch.ones((), device=device)
        self.graph = torch.cuda.CUDAGraph()
        self.loss = None

    def load(self, batch: dict, n_targets: int):
        for name, tensor in self.inputs.items():
            if tensor is not None:
                tensor.copy_(batch[name], non_blocking=True)
        self.divisor.fill_(max(n_targets, 1))

    def warm_up_and_record(self, n_targets: int) -> torch.Tensor:
        """This micro-batch eagerly (on a side stream, as PyTorch's CUDA graph recipe warms up),
        then the graph of it, recorded, not run: the gradients get this micro-batch once."""
        self.divisor.fill_(max(n_targets, 1))
        if self.steps.pool is None:
            self.steps.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.steps.device)
        side.wait_stream(torch.cuda.current_stream(self.steps.device))
        with torch.cuda.stream(side):
            loss = self.steps.micro_step(self.inputs, self.divisor)
        torch.cuda.current_stream(self.steps.device).wait_stream(side)
        try:
            with torch.cuda.graph(self.graph, pool=self.steps.pool):
                self.loss = self.steps.micro_step(self.inputs, self.divisor)
        except RuntimeError as e:  # nothing recorded ran: the gradients hold the warm-up's alone
            self.steps.failed = str(e).strip().splitlines()[0][:200]
            print(f"note: recording a CUDA graph failed ({self.steps.failed}); the steps run "
                  "eagerly", file=sys.stderr)
        return loss


def use_cuda_graphs(model, loss_fn):
    """From now on train_step runs each micro-batch through a CUDA graph (model.cuda_graphs)."""
    model.cuda_graphs = GraphedMicroSteps(model, loss_fn)
