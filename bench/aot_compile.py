"""Compile the project's Triton flash-attention kernels for sm_90 / sm_80 WITHOUT a GPU, and report
per kernel and autotune config: success, shared memory, registers, spills, warps, stages.

How: Triton's JIT asks its "active driver" for the target, device and stream. A stand-in driver that
answers GPUTarget("cuda", CAP, 32) lets `kernel.warmup(...)` (which compiles but never launches) run the
exact binder/specialisation path that a real launch would take, with the exact arguments that
kernels/flash.py builds (its own `_launch_args`), on CPU tensors of the right shapes and strides.
ptxas (shipped in the triton wheel) is then re-run with -v on each PTX to read registers and spills.

    TRITON_INTERPRET=0 python bench/aot_compile.py --root . [--caps 90 80] [--json out.json]

Run from anywhere; it imports kernels/ from --root. It never writes into --root (bytecode off).
gpu_check.py also uses it to pre-compile, in parallel processes, the kernels its checks will launch:
`--spec shapes.json --shard i/N --no-usage` with a shared TRITON_CACHE_DIR (the compiled kernels land in
Triton's on-disk cache under the same keys a real launch on that GPU computes, so the launches that
follow load them instead of compiling one by one inside the autotuner).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"  # compiled-mode JIT functions even without CUDA
sys.dont_write_bytecode = True
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="aot-triton-cache-"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

# Limits (bytes of dynamic shared memory one block may opt into; registers per SM)
SMEM_LIMIT = {90: 232448, 80: 166912}  # H100/H200: 227 KiB; A100: 163 KiB
REGS_PER_SM = 65536


class StandInDriver:
    """Just enough of a Triton driver for compile-only warmup()."""

    def __init__(self, cap):
        self.target = GPUTarget("cuda", cap, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def ptxas_usage(ptx: str, cap: int) -> dict:
    """Registers / spills / smem as ptxas -v reports them for this PTX (same flags as Triton's make_cubin)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    ptxas = get_ptxas(cap).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
                            f"--gpu-name={sm_arch_from_capability(cap)}", src, "-o", src + ".o"],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    out = {"ptxas_rc": r.returncode}
    m = re.search(r"Used (\d+) registers", log)
    out["regs"] = int(m.group(1)) if m else None
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    out["spill_stores"], out["spill_loads"] = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    m = re.search(r"(\d+) bytes stack frame", log)
    out["stack"] = int(m.group(1)) if m else None
    warn = [ln.strip() for ln in log.splitlines() if "warning" in ln.lower()]
    if warn:
        out["ptxas_warnings"] = warn[:5]
    return out


def shapes():
    """(name, B, Hq, Hkv, T, S, D, causal, padded, layout): what the model launches at Mistral-7B shapes.

    layout "model": q/k/v are transposed views of (B, T, H, D) projections, as model.py passes them;
    "contig": (B, H, T, D) contiguous, as bench/bench_attention.py passes them.
    The kernel code depends only on the constexprs and on Triton's integer specialisation (==1, %16==0),
    so a small batch stands in for the real one."""
    out = []
    for T in (256, 1024, 4096):
        for causal in (True, False):
            out.append((f"T{T}-{'causal' if causal else 'full'}", 2, 32, 8, T, T, 128, causal, False, "contig"))
    out.append(("T1024-causal-kpm-model", 2, 32, 8, 1024, 1024, 128, True, True, "model"))
    out.append(("T2048-full-kpm-model", 2, 32, 8, 2048, 2048, 128, False, True, "model"))
    out.append(("clara-doc-267-causal-kpm", 4, 32, 8, 267, 267, 128, True, True, "model"))
    out.append(("decode-T1-S300-kpm-cache", 1, 32, 8, 1, 300, 128, True, True, "cache"))
    return out


def shapes_from_spec(path, dtype="bf16"):
    """The same tuples as shapes(), from a JSON list of dicts (name, B, Hq, Hkv, T, S, D, causal, padded, layout,
    optional dtype: bf16 | fp16 | fp32, default bf16), keeping those of one dtype."""
    with open(path) as f:
        spec = json.load(f)
    return [(d["name"], d["B"], d["Hq"], d["Hkv"], d["T"], d["S"], d["D"], d["causal"], d["padded"], d["layout"])
            for d in spec if d.get("dtype", "bf16") == dtype]


def make_inputs(B, Hq, Hkv, T, S, D, layout, dtype):
    if layout == "model":
        q = torch.empty(B, T, Hq, D, dtype=dtype).transpose(1, 2)
        k = torch.empty(B, S, Hkv, D, dtype=dtype).transpose(1, 2)
        v = torch.empty(B, S, Hkv, D, dtype=dtype).transpose(1, 2)
    elif layout == "cache":  # KVCache.update returns a slice of a (B, Hkv, max_len, D) buffer
        q = torch.empty(B, T, Hq, D, dtype=dtype).transpose(1, 2)
        kc = torch.empty(2, B, Hkv, S + 37, D, dtype=dtype)
        k, v = kc[0, :, :, :S], kc[1, :, :, :S]
    else:
        q = torch.empty(B, Hq, T, D, dtype=dtype)
        k = torch.empty(B, Hkv, S, D, dtype=dtype)
        v = torch.empty(B, Hkv, S, D, dtype=dtype)
    return q, k, v


def compile_all(flash, cap, dtype, selected, shape_list=None, shard=(0, 1), usage=True, bwd_preprocess=True,
                max_configs=None):
    triton.runtime.driver.set_active(StandInDriver(cap))
    kernels = {"fwd": flash._fwd_kernel, "bwd_dkdv": flash._bwd_dkdv_kernel, "bwd_dq": flash._bwd_dq_kernel}
    for kern in list(kernels.values()) + [flash._bwd_preprocess]:
        fn = kern.fn if isinstance(kern, triton.runtime.Autotuner) else kern  # Autotuner -> JITFunction
        fn.device_caches.clear()  # re-bind for the new target
    rows = []
    seen = {}
    job = -1
    for (name, B, Hq, Hkv, T, S, D, causal, padded, layout) in (shape_list or shapes()):
        if selected and not any(s in name for s in selected):
            continue
        q, k, v = make_inputs(B, Hq, Hkv, T, S, D, layout, dtype)
        kpm_in = (torch.arange(S)[None, :] >= 5).expand(B, S).contiguous() if padded else None
        kpm, args = flash._launch_args(q, k, causal, kpm_in, None, None)
        o = torch.empty(B, Hq, T, D, dtype=dtype)
        lse = torch.empty(B, Hq, T, dtype=torch.float32)
        do = torch.empty_like(o)
        dk = torch.empty(B, Hkv, S, D, dtype=dtype)
        dv = torch.empty_like(dk)
        calls = {
            "fwd": (q, k, v, o, lse, kpm, *q.stride(), *k.stride(), *v.stride(), *o.stride()),
            "bwd_dkdv": (q, k, v, do, lse, lse, dk, dv, kpm, *q.stride(), *k.stride(), *v.stride(),
                         *do.stride(), *dk.stride()),
            "bwd_dq": (q, k, v, do, lse, lse, o, kpm, *q.stride(), *k.stride(), *v.stride(), *do.stride()),
        }
        for kname, kern in kernels.items():
            if T == 1 and kname != "fwd":
                continue  # decoding runs under inference_mode: no backward
            configs = kern.configs[:max_configs] if max_configs else kern.configs
            for cfg in configs:
                job += 1
                if job % shard[1] != shard[0]:
                    continue
                tag = (f"BM{cfg.kwargs['BLOCK_M']}-BN{cfg.kwargs['BLOCK_N']}-w{cfg.num_warps}-s{cfg.num_stages}")
                row = dict(cap=cap, dtype=str(dtype).replace("torch.", ""), shape=name, kernel=kname,
                           config=tag, BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=cfg.kwargs["BLOCK_N"],
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                t0 = time.time()
                try:
                    ck = kern.fn.warmup(*calls[kname], **args, **cfg.all_kwargs(), grid=(1,))
                    row["ok"] = True
                    row["shared"] = ck.metadata.shared
                    row["smem_fits"] = ck.metadata.shared <= SMEM_LIMIT[cap]
                    key = ck.hash
                    if not usage:
                        pass
                    elif key not in seen:
                        seen[key] = ptxas_usage(ck.asm["ptx"], cap)
                        ptx = ck.asm["ptx"]
                        seen[key]["mma"] = ("wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx
                                            else "fma-only")
                        seen[key]["tma"] = "cp.async.bulk" in ptx
                        seen[key]["cp_async"] = "cp.async" in ptx
                        seen[key]["hash"] = key[:12]
                    row.update(seen.get(key, {}))
                    if row.get("regs"):
                        thr = cfg.num_warps * 32
                        row["blocks_per_sm_by_regs"] = REGS_PER_SM // (row["regs"] * thr)
                except Exception as e:  # noqa: BLE001
                    row["ok"] = False
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                row["compile_s"] = round(time.time() - t0, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    # the delta preprocess kernel (not autotuned)
    for T in ((256, 267) if bwd_preprocess and shard[0] == 0 else ()):
        o = torch.empty(2, 32, T, 128, dtype=dtype)
        row = dict(cap=cap, dtype=str(dtype).replace("torch.", ""), shape=f"T{T}", kernel="bwd_preprocess",
                   config="BM64-w4(default)-s3(default)", BLOCK_M=64, BLOCK_N=None, num_warps=4, num_stages=3)
        try:
            ck = flash._bwd_preprocess.warmup(o, o, torch.empty(2, 32, T), *o.stride(), T, 32, HEAD_DIM=128,
                                              D_PAD=128, BLOCK_M=flash.PREPROCESS_BLOCK_M, grid=(1,))
            row.update(ok=True, shared=ck.metadata.shared, **(ptxas_usage(ck.asm["ptx"], cap) if usage else {}))
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="project checkout (holds kernels/)")
    p.add_argument("--caps", type=int, nargs="+", default=[90, 80])
    p.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--only", nargs="*", default=[], help="substrings of shape names to compile")
    p.add_argument("--json", default=None)
    p.add_argument("--spec", default=None, help="JSON list of shapes to compile instead of the built-in ones")
    p.add_argument("--shard", default="0/1", help="i/N: compile only every N-th (shape, kernel, config) job from i")
    p.add_argument("--no-usage", action="store_true", help="skip re-running ptxas -v (compile only)")
    p.add_argument("--max-configs", type=int, default=None, help="only the first N autotune configs of each kernel")
    a = p.parse_args()
    shard = tuple(int(x) for x in a.shard.split("/"))
    spec_dtypes = None
    if a.spec:
        with open(a.spec) as f:
            spec_dtypes = sorted({d.get("dtype", "bf16") for d in json.load(f)})
    sys.path.insert(0, os.path.abspath(a.root))
    import kernels.flash as flash
    assert not flash.INTERPRET, "kernels.flash picked the interpreter; TRITON_INTERPRET must be 0"
    rows = []
    for cap in a.caps:
        for dt in (spec_dtypes or a.dtypes):
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt]
            shape_list = shapes_from_spec(a.spec, dt) if a.spec else None
            rows += compile_all(flash, cap, dtype, a.only, shape_list, shard, not a.no_usage, a.spec is None,
                                a.max_configs)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["ok"] or (r.get("spill_stores") or 0) > 0 or not r.get("smem_fits", True)]
    print(f"\n{len(rows)} compiles, {sum(r['ok'] for r in rows)} ok, {len(bad)} failing/spilling/over-smem")


if __name__ == "__main__":
    main()
