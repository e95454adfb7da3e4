"""The MLA layer: the absorbed (latent-cache, MQA) form computes what the naive form does."""

import pytest
import torch

from common import runtime
from common.checks import assert_close, rel_error

import flash_mla
from mla_layer import DEEPSEEK_V2, MLALayer, MLAShapes, cache_bytes_per_token

SMALL = MLAShapes(d_model=256, n_heads=8, q_lora_rank=96)


def _decode_both(layer, steps, batch, gen, attend=None):
    x = torch.randn(steps, batch, layer.shapes.d_model, generator=gen, dtype=torch.float64)
    naive_cache, latent_cache, outs = {}, {}, []
    for t in range(steps):
        pos = torch.full((batch,), t)
        a = layer.decode_naive(x[t], pos, naive_cache)
        b = layer.decode_absorbed(x[t], pos, latent_cache, attend)
        outs.append((a, b))
    return outs, naive_cache, latent_cache


@pytest.mark.parametrize("shapes", [SMALL, MLAShapes()], ids=["small", "default"])
def test_absorbed_form_equals_naive_form(shapes):
    layer = MLALayer(shapes, seed=1)
    outs, naive_cache, latent_cache = _decode_both(layer, 9, 2, torch.Generator().manual_seed(0))
    for a, b in outs:
        assert_close(b, a, atol=1e-10, rtol=1e-9, name="absorbed vs naive")
        assert a.abs().mean() > 1e-3        # not trivially zero
    # what each form keeps per token
    assert latent_cache["kv"].shape[-1] == 576
    naive_per_token = (naive_cache["k"][0, 0].numel() + naive_cache["v"][0, 0].numel())
    assert naive_per_token * 2 == cache_bytes_per_token(shapes)["naive (per-head K and V)"]


def test_bytes_per_token_deepseek_v2():
    b = cache_bytes_per_token(DEEPSEEK_V2)
    assert b["naive (per-head K and V)"] == 128 * (192 + 128) * 2 == 81920
    assert b["MLA latent (c_kv + k_pe)"] == 576 * 2 == 1152


def test_absorbed_form_through_the_kernel():
    """The MQA step by flash_mla_with_kvcache on a paged bf16 cache."""
    dev = runtime.torch_device()
    layer = MLALayer(SMALL, seed=2)

    def attend(q, kv, scale):
        k_cache, block_table, lens = flash_mla.pack_pages(kv[:, :, None].to(dev, torch.bfloat16))
        sched, _ = flash_mla.get_mla_metadata()
        out, _ = flash_mla.flash_mla_with_kvcache(
            q[:, None].to(dev, torch.bfloat16), k_cache, block_table, lens, 512, sched,
            softmax_scale=scale)
        return out[:, 0].to("cpu", torch.float64)

    gen = torch.Generator().manual_seed(3)
    outs, _, _ = _decode_both(layer, 3, 2, gen, attend)
    for a, b in outs:
        assert rel_error(b, a) < 2e-2      # bf16 cache and queries: ~3 significant digits


@pytest.mark.slow
def test_compile_report_runs_without_a_gpu():
    """The README's register/shared-memory figures come from this script: keep it working."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).with_name("mla_compile_report.py")
    r = subprocess.run([sys.executable, str(script), "16,512,4,2"], capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    import re
    smem = re.search(r"'smem_bytes': (\d+)", r.stdout)
    assert "'regs': " in r.stdout and smem, r.stdout
    assert int(smem.group(1)) <= 227 * 1024   # fits an H100 SM, as the lesson claims
