"""By hand, not a test: the exported GGUF files in llama.cpp itself (llama-cpp-python), against
this project's reading of the same files. docs/formats.md has the command and the numbers.

    python examples/compare_llamacpp.py REFERENCE.gguf EXPORT.gguf ... [--quantize LIBDIR]
        [--tokenizer PATH] [--template NAME]

For each export: llama.cpp's logits on a chat prompt against ours on the same file (what
llama.cpp's arithmetic adds) and against ours on REFERENCE (an f32 export: what the type costs),
top-1 agreement over the positions and the largest difference; then each one's greedy answer
(argmax, token by token, from both).
--quantize LIBDIR also quantises blocks with ggml's own quantize_chunk (libggml-base.so in
LIBDIR) and compares the bytes with formats/gguf_quant.py's.
"""
import ctypes
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from formats.checkpoint import load_checkpoint  # noqa: E402
from data import encode_prompt  # noqa: E402
from generate import generate  # noqa: E402
from formats.gguf_quant import TYPE_IDS, quantize  # noqa: E402
from templates import get_template  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

PROMPT = "Give three tips for staying healthy."


def our_logits(path, ids):
    model, _ = load_checkpoint(path)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids]))[0], model


def llama_cpp_logits(path, ids):
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), logits_all=True, n_ctx=512, verbose=False, n_threads=8)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)])), llm


def llama_cpp_greedy(llm, ids, stop_ids, n):
    out = []
    for _ in range(n):
        llm.reset()
        llm.eval(ids + out)
        token = int(np.argmax(llm.scores[len(ids) + len(out) - 1]))
        if token in stop_ids:
            break
        out.append(token)
    return out


def compare(name, a, b):
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"  {name}: top-1 agreement {top1:.3f}, max |difference| "
          f"{(a - b).abs().max().item():.4f}")


def quantisers_against_ggml(libdir):
    lib = ctypes.CDLL(str(Path(libdir) / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 256, generator=g) * torch.rand(4096, 1, generator=g)
    x[0] = 0
    x = x.reshape(-1).contiguous()
    for name in ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"]:
        ours = quantize(x, TYPE_IDS[name]).numpy()
        theirs = np.zeros_like(ours)
        lib.ggml_quantize_chunk(TYPE_IDS[name], x.numpy().ctypes.data, theirs.ctypes.data,
                                0, 4096, 256, None)
        same = (ours.reshape(4096, -1) == theirs.reshape(4096, -1)).all(axis=1).mean()
        print(f"  {name}: {same:.4f} of the blocks byte for byte as ggml's quantize_chunk")


def option(args, name, default=None):
    if name not in args:
        return default
    i = args.index(name)
    value = args[i + 1]
    del args[i:i + 2]
    return value


def main():
    args = sys.argv[1:]
    libdir = option(args, "--quantize")
    if libdir:
        print("quantisers against ggml:")
        quantisers_against_ggml(libdir)
    tokenizer_path = option(args, "--tokenizer")
    template = get_template(option(args, "--template", "chatml"))
    reference, exports = args[0], args[1:]
    tokenizer = Tokenizer.from_file(tokenizer_path or reference)
    ids = encode_prompt(PROMPT, tokenizer, template)
    ref, _ = our_logits(reference, ids)
    for path in exports:
        print(path)
        ours, model = our_logits(path, ids)
        theirs, llm = llama_cpp_logits(path, ids)
        compare("llama.cpp vs ours, same file", theirs, ours)
        compare("llama.cpp vs ours on the f32 export", theirs, ref)
        compare("ours vs ours on the f32 export", ours, ref)
        answer = llama_cpp_greedy(llm, ids, tokenizer.stop_ids, 48)
        print("  llama.cpp greedy:", repr(tokenizer.decode(answer)))
        greedy = list(generate(model, tokenizer, ids, 48, temperature=0.0))
        print("  ours greedy:     ", repr(tokenizer.decode(greedy)), flush=True)


if __name__ == "__main__":
    main()
