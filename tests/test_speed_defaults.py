"""The speed defaults (config.resolve_speed): on a GPU, --cuda-graphs and --pad-to-multiple-of 64
unless the run rules them out, and --compile when the run is long enough (None until
train_sft.py knows: speed/fused_loss.compile_pays); on a CPU, and for the demo, as before.
And train_step's way through speed/cuda_graphs.py, as far as a CPU can run it."""
import pytest
import torch

from config import GRAPH_WIDTH_MULTIPLE, parse_args
from errors import UserError

REAL = ["--checkpoint", "model.gguf", "--data", "alpaca.json"]  # (parse_args opens neither)


@pytest.fixture
def one_gpu(monkeypatch):
    """parse_args as on a machine with one bf16 GPU (the flags are resolved, nothing runs)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.delenv("RANK", raising=False)


def speed(config):
    return config.compile, config.cuda_graphs, config.pad_to_multiple_of


def test_a_cpu_run_and_the_demo_keep_their_defaults():
    assert speed(parse_args(REAL + ["--device", "cpu"])) == (False, False, 1)
    assert speed(parse_args(["--device", "cpu"])) == (False, False, 1)


def test_on_a_gpu_the_fast_paths_are_the_default(one_gpu):
    assert speed(parse_args(REAL)) == (None, True, GRAPH_WIDTH_MULTIPLE)
    assert speed(parse_args(REAL + ["--method", "full"])) == (None, True, GRAPH_WIDTH_MULTIPLE)
    assert speed(parse_args(REAL + ["--no-compile"])) == (False, True, GRAPH_WIDTH_MULTIPLE)
    assert speed(parse_args(REAL + ["--compile"])) == (True, True, GRAPH_WIDTH_MULTIPLE)
    assert speed(parse_args(REAL + ["--no-cuda-graphs"])) == (None, False, 1)
    assert speed(parse_args(REAL + ["--pad-to-multiple-of", "128"])) == (None, True, 128)
    # the demo: a run of seconds, as before
    assert speed(parse_args(["--checkpoint", "tiny"])) == (False, False, 1)
    assert speed(parse_args(["--checkpoint", "tiny", "--compile"])) == (True, False, 1)


@pytest.mark.parametrize("flags, reason", [
    (["--method", "qlora"], "--method lora or full (QLoRA's embedding stays in CPU memory)"),
    (["--precision", "fp16"], "--precision bf16 or fp32 (fp16's loss scaling skips steps on the "
                              "CPU's word)"),
    (["--grad-ckpt"], "no --grad-ckpt"),
])
def test_cuda_graphs_step_aside_where_they_cannot_run(one_gpu, flags, reason):
    assert speed(parse_args(REAL + flags)) == (None, False, 1)
    with pytest.raises(UserError) as info:
        parse_args(REAL + flags + ["--cuda-graphs"])
    assert str(info.value) == f"--cuda-graphs needs {reason}"


def test_cuda_graphs_step_aside_under_torchrun(one_gpu, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert speed(parse_args(REAL)) == (None, False, 1)


def test_cuda_graphs_need_a_gpu():
    with pytest.raises(UserError) as info:
        parse_args(REAL + ["--device", "cpu", "--cuda-graphs"])
    assert str(info.value) == "--cuda-graphs needs a GPU"


# ---------------------------------------------------------------- train_step and model.cuda_graphs

def one_step(graphed: bool):
    """(model, loss, {name: gradient}) of one train_step of 2 micro-batches on the tiny shape;
    graphed: through model.cuda_graphs' eager path (what runs after a failed recording: a CPU
    cannot record), which takes train_step's graph branch."""
    import train_sft
    from batching import collate
    from model import ModelConfig, Transformer
    from speed.cuda_graphs import use_cuda_graphs
    model = Transformer(ModelConfig.from_name("tiny"))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.train()
    g = torch.Generator().manual_seed(1)
    examples = [(ids, [-100] * 3 + ids[3:]) for ids in
                (torch.randint(0, 512, (n,), generator=g).tolist() for n in (9, 14, 6, 11))]
    micro = [collate([[e] for e in examples[i:i + 2]], 0, packed=False) for i in (0, 2)]
    config = train_sft.TrainConfig(device="cpu", precision="fp32", grad_clip=0, loss_chunk=0)
    if graphed:
        use_cuda_graphs(model, lambda m, batch: train_sft.batch_loss(m, batch, "cpu", "fp32"))
        model.cuda_graphs.failed = "a CPU"
    optimizer = train_sft.make_optimizer(model, 0.0, 0.0, "cpu")
    grads = {}
    optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
    n_targets = sum(train_sft.count_targets(b) for b in micro)
    loss, _ = train_sft.train_step(model, optimizer, micro, n_targets, config)
    return model, loss, grads, (optimizer, micro, n_targets, config)


def test_train_step_through_the_graphs_gives_the_same_loss_and_gradients():
    _, loss, grads, _ = one_step(graphed=False)
    model, graphed_loss, graphed_grads, (optimizer, micro, n_targets, config) = one_step(True)
    assert graphed_loss == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == graphed_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, graphed_grads[name], rtol=1e-5, atol=1e-7), name
    # the gradients stay the tensors the graphs add into, zeroed in place for the next step
    assert all(p.grad is g and not g.any()
               for p, g in zip(model.cuda_graphs.params, model.cuda_graphs.grads))
    import train_sft
    optimizer.zero_grad(set_to_none=True)  # what a graph could no longer see
    with pytest.raises(RuntimeError, match="zero them in place"):
        train_sft.train_step(model, optimizer, micro, n_targets, config)


def test_compile_pays_on_a_long_run_not_a_short_one():
    """The README's SmolLM2 run (950 Alpaca examples, 3 epochs: 0.31M tokens) is too short to win
    back compiling; 52k examples (16M tokens) are not; a model 8 times larger pays 8 times
    sooner."""
    from batching import StepBatches
    from speed.fused_loss import COMPILE_PAYS_AFTER, compile_pays

    class Model:  # only its parameter count matters
        def __init__(self, n):
            self.n = n

        def parameters(self):
            return [torch.empty(self.n, device="meta")]

    examples = [([1] * 110, [1] * 110)] * 950
    said = []
    for epochs, parameters, pays in [(3, 135e6, False), (3 * 55, 135e6, True),
                                     (3 * 5, 135e6, False), (3 * 5, 8 * 135e6, True)]:
        batches = StepBatches(lambda epoch: examples, 8, 4, epochs=epochs, pad_id=0,
                              max_seq_len=512)
        tokens = 110 * 950 * batches.total_steps * 4 / batches.per_epoch
        assert (tokens * parameters >= COMPILE_PAYS_AFTER) == pays
        assert compile_pays(Model(int(parameters)), batches, said.append) == pays
    assert said[0] == ("compile: off, the run's 0.32M tokens would not win back its one-time cost "
                       "(about a minute; it pays from about 6.0M tokens of this model: --compile "
                       "compiles anyway)")
    assert said[1] == ("compile: on, the run's 17.2M tokens win back its one-time cost (the first "
                       "steps compile each block and the loss, about a minute; --no-compile skips "
                       "it)")
