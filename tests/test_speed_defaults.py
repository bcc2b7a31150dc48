"""The speed defaults (config.resolve_speed): on a GPU, --compile, --cuda-graphs and
--pad-to-multiple-of 64 unless the run rules them out; on a CPU, and for the demo, as before."""
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
    assert speed(parse_args(REAL)) == (True, True, GRAPH_WIDTH_MULTIPLE)
    assert speed(parse_args(REAL + ["--method", "full"])) == (True, True, GRAPH_WIDTH_MULTIPLE)
    assert speed(parse_args(REAL + ["--no-compile"])) == (False, True, GRAPH_WIDTH_MULTIPLE)
    assert speed(parse_args(REAL + ["--no-cuda-graphs"])) == (True, False, 1)
    assert speed(parse_args(REAL + ["--pad-to-multiple-of", "128"])) == (True, True, 128)
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
    assert speed(parse_args(REAL + flags)) == (True, False, 1)
    with pytest.raises(UserError) as info:
        parse_args(REAL + flags + ["--cuda-graphs"])
    assert str(info.value) == f"--cuda-graphs needs {reason}"


def test_cuda_graphs_step_aside_under_torchrun(one_gpu, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert speed(parse_args(REAL)) == (True, False, 1)


def test_cuda_graphs_need_a_gpu():
    with pytest.raises(UserError) as info:
        parse_args(REAL + ["--device", "cpu", "--cuda-graphs"])
    assert str(info.value) == "--cuda-graphs needs a GPU"
