"""bench/profiling.py: what `python -m bench --profile` reports (kernel classes, the peak)."""
import pytest

from bench import profiling

# kernel names as an H100 profile of bench/bench.py and of the peer shows them
KERNELS = [
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wg_knob_7_64x128x128", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("triton_poi_fused_add_mul_silu_0", "elementwise and reductions"),
    ("_rms_norm_forward_kernel", "elementwise and reductions"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
     "optimizer and clipping"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("Memcpy DtoD (Device -> Device)", "copies and fills"),
    ("aten::mm", "matmul"),
]


@pytest.mark.parametrize("name, kind", KERNELS)
def test_kernel_class(name, kind):
    assert profiling.kernel_class(name) == kind


def test_peak_allocations_lists_what_is_alive_at_the_peak():
    ours = [{"filename": "/usr/lib/python3/site-packages/torch/nn/functional.py", "line": 1,
             "name": "linear"}, {"filename": "/repo/model.py", "line": 120, "name": "forward"}]
    loss = [{"filename": "/repo/speed/fused_loss.py", "line": 57, "name": "forward"}]
    trace = [dict(action="alloc", addr=1, size=3 * 2**30, frames=ours),
             dict(action="alloc", addr=2, size=2**30, frames=loss),
             dict(action="free_requested", addr=1, size=3 * 2**30, frames=ours),
             dict(action="free_completed", addr=1, size=3 * 2**30, frames=ours),
             dict(action="alloc", addr=3, size=2 * 2**30, frames=loss)]
    lines = profiling.peak_allocations({"device_traces": [trace]}, before=2**30)
    assert lines[0] == "memory at the step's peak: 5.00 GiB"  # 1 before + 3 + 1, not 1 + 1 + 2
    assert lines[1].split()[-2:] == ["1.00", "GiB"]
    rows = {line.rsplit(None, 2)[0].strip(): line.split()[-2] for line in lines[2:]}
    assert rows == {"model.py:120 forward": "3.00", "fused_loss.py:57 forward": "1.00"}


def test_bench_profile_on_a_cpu_prints_time_by_class_and_the_bound(capsys):
    from bench import bench
    bench.main(["--shape", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1",
                "--profile"])
    err = capsys.readouterr().err
    assert err.startswith("one step: ")
    assert "  matmul  " in err and "  attention  " in err
    assert "bound if every product ran at it and nothing else:" in err
