"""GPU readiness check of the clara project's attention kernel and GPU code paths (one H100/H200).

Run from the project checkout root (the folder holding kernels/, model.py, bench/):

    bash bench/gpu_check.sh                    # OUT=<folder> for the results (default ./gpu_check_out)
    python bench/gpu_check.py --root . --out OUT [--budget 440] [--parts env cold p a b c d e]
    python bench/gpu_check.py --root . --out OUT --dry-run    # CPU, tiny shapes, TRITON_INTERPRET=1

Exit status: 0 when every part ran (or ran out of its time budget) without an error and every correctness
case of part a passed; 1 otherwise (the reason is in gpu_check.md). tests/test_gpu_check.py runs the dry run.

Parts (each in try/except with its own time budget; results are written after every measurement):
  env  versions, device, and the torch APIs the project imports (FSDP2, DCP state dicts, sdpa_kernel)
  cold the first fwd+bwd call at the CLaRa document shape with nothing cached (compile + autotune cost)
  p    pre-compiles every other kernel variant the parts below launch, in parallel processes, with
       aot_compile.py (next to this file) into the Triton cache, so that the serial compiles inside
       Triton's autotuner do not eat the time budget
  a    correctness: kernel (bf16) vs an fp32 reference and vs SDPA in bf16, output + dQ/dK/dV, at
       Mistral-7B head shapes (Hq 32 / Hkv 8 / D 128), causal and not, left key padding, the CLaRa
       document shape (267 tokens), KV-cache decode, > 2^31-element tensors (int64 offsets),
       determinism of the backward, the dispatcher's default and its refusals
  b    speed: TFLOP/s of the kernel vs SDPA's flash backend, fwd and fwd+bwd, seq 512..8192 at
       batch*seq = 16k, causal/non-causal; the CLaRa document shape vs the masked SDPA path the model
       would use without the kernel; first-call (compile + autotune) seconds; the autotuner's picks
  c    one LoRA training step (stage 1 and stage 3) of a Mistral-7B-shaped model with random bf16
       weights, as bench/bench_train.py does it: tokens/s and MFU, attention = triton vs sdpa
  d    batch-1 bf16 greedy decode tokens/s of model.generate on the same 7B-shaped model: prefill attention
       triton vs sdpa (the per-token step is kernels.decode_attention either way), then generate(compile=True)
       (torch.compile of the step + CUDA graphs, gpt-fast style; skipped on a dry run: minutes on a CPU)
  e    the project's own GPU tests (tests/test_flash.py's GPU subset, tests/test_dispatch.py), with whatever
       time is left

Outputs in OUT: gpu_check.json (everything), gpu_check.md (tables), gpu_check.log is the stdout copy
written by gpu_check.sh.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

P = argparse.ArgumentParser(description=__doc__.split("\n")[0])
P.add_argument("--root", default=".", help="project checkout (default: the current folder)")
P.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
P.add_argument("--budget", type=float, default=440.0, help="seconds for all parts together")
P.add_argument("--parts", nargs="+", default=["env", "cold", "p", "a", "b", "c", "d", "e"])
P.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
ARGS = P.parse_args()

if ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # before torch/triton are imported
# part p's compile processes and this one must share one Triton cache (gpu_check.sh sets a private one)
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".triton", "cache"))
ROOT = os.path.abspath(ARGS.root)
sys.path.insert(0, ROOT)
sys.dont_write_bytecode = True
os.makedirs(ARGS.out, exist_ok=True)

import torch  # noqa: E402
# Heavy imports first, outside any part's alarm: an alarm that fires inside an import leaves a half-initialised
# module behind (sympy without sympy.printing) and every later part fails on it.
import torch._dynamo  # noqa: E402,F401
import torch.fx.experimental.symbolic_shapes  # noqa: E402,F401
import torch.distributed.checkpoint  # noqa: E402,F401

T_START = time.time()
DEADLINE = T_START + ARGS.budget
DRY = ARGS.dry_run
CUDA = torch.cuda.is_available() and not DRY
DEV = torch.device("cuda" if CUDA else "cpu")
BF16 = torch.bfloat16
HBM_BW = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s, for the decode roofline

RESULTS = {"meta": {}, "parts": {}}
MD = {}


def log(*a):
    print(*a, flush=True)


def left():
    return DEADLINE - time.time()


def save():
    with open(os.path.join(ARGS.out, "gpu_check.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    with open(os.path.join(ARGS.out, "gpu_check.md"), "w") as f:
        f.write(f"# clara GPU check ({'DRY RUN on CPU' if DRY else 'GPU'})\n\n")
        meta = RESULTS["meta"]
        f.write(" ".join(f"{k}={v}" for k, v in meta.items()) + "\n\n")
        for name, st in RESULTS["parts"].items():
            f.write(f"## part {name}: {st.get('status')} ({st.get('seconds', 0):.0f} s)\n\n")
            if st.get("error"):
                f.write("```\n" + st["error"][-2000:] + "\n```\n\n")
            for line in MD.get(name, []):
                f.write(line + "\n")
            f.write("\n")


class PartTimeout(BaseException):
    """The alarm of a part's time budget; a BaseException, so that no `except Exception` swallows it."""


def _alarm(signum, frame):
    raise PartTimeout()


def _caused_by_timeout(e):
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, PartTimeout):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def recorded(row: dict, on_error=None, mark_failed: bool = True):
    """One check case: an error (not the part's time budget running out) is written into its row (and the
    row marked failed, or `on_error()` called), and the part goes on with the next case."""
    try:
        yield
    except PartTimeout:
        raise
    except Exception as e:  # noqa: BLE001
        if _caused_by_timeout(e):  # wrapped by the interpreter
            raise
        row["error"] = f"{type(e).__name__}: {e}"[:500]
        if mark_failed:
            row["ok"] = False
        if on_error is not None:
            on_error()


def add_row(rows: list, md: list, row: dict, key: str, figures) -> None:
    """One row of a speed table (parts b, c): into the part's rows and the log, and a markdown line of `key`
    (its first cells) and then its figures (`figures()`, called only for a row without an error) or the error."""
    rows.append(row)
    log(json.dumps(row))
    md.append(f"| {key} | ERROR {row['error'][:120]} |" if "error" in row else f"| {key} | {figures()} |")


def run_part(name, fn, budget):
    budget = max(1.0, min(budget, left()))
    st = RESULTS["parts"].setdefault(name, {})
    st.update(status="running", budget_s=round(budget))
    MD.setdefault(name, [])
    log(f"\n===== part {name}: budget {budget:.0f} s, {left():.0f} s left overall =====")
    t0 = time.time()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(math.ceil(budget)))
    try:
        fn(st, MD[name], t0 + budget)
        st["status"] = "ok"
    except PartTimeout:
        st["status"] = "timeout"
        log(f"part {name}: time budget spent")
    except Exception as e:  # noqa: BLE001
        if _caused_by_timeout(e):  # the alarm fired inside Triton's interpreter, which wraps the exception
            st["status"] = "timeout"
            log(f"part {name}: time budget spent")
        else:
            st["status"] = "error"
            st["error"] = traceback.format_exc()
            log(st["error"])
    finally:
        signal.alarm(0)
        st["seconds"] = round(time.time() - t0, 1)
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        save()


def sync():
    if CUDA:
        torch.cuda.synchronize()


def bench_ms(fn, grads=()):
    """Mean ms of fn(); triton.testing.do_bench on GPU, a few perf_counter repeats on CPU."""
    if CUDA:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads))
    ts = []
    for _ in range(2):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * min(ts)


# ----------------------------------------------------------------------------------------------------
# env

def part_env(st, md, end):
    import torch.nn.functional as F
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda_available=torch.cuda.is_available())
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        info["triton"] = f"import failed: {e!r}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
                    mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled())
    apis = {}
    for label, stmt in [
        ("fsdp2 fully_shard + MixedPrecisionPolicy", "from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy"),
        ("dcp + state_dict API", "import torch.distributed.checkpoint as dcp; "
                                  "from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict, StateDictOptions"),
        ("sdpa_kernel/SDPBackend", "from torch.nn.attention import SDPBackend, sdpa_kernel"),
        ("checkpoint(use_reentrant=False)", "from torch.utils.checkpoint import checkpoint"),
    ]:
        try:
            exec(stmt, {})
            apis[label] = "ok"
        except Exception as e:  # noqa: BLE001
            apis[label] = f"FAILED {e!r}"
    try:
        q = torch.randn(1, 4, 8, 16, device=DEV)
        F.scaled_dot_product_attention(q, q[:, :2], q[:, :2], enable_gqa=True, scale=0.3)
        apis["sdpa enable_gqa + scale"] = "ok"
    except Exception as e:  # noqa: BLE001
        apis["sdpa enable_gqa + scale"] = f"FAILED {e!r}"
    info["apis"] = apis
    st.update(info)
    RESULTS["meta"].update({k: info.get(k) for k in ("gpu", "capability", "torch", "triton", "cuda")})
    md.append("| item | value |")
    md.append("|---|---|")
    for k, v in info.items():
        if k != "apis":
            md.append(f"| {k} | {v} |")
    for k, v in apis.items():
        md.append(f"| API: {k} | {v} |")
    log(json.dumps(info, indent=1))


# ----------------------------------------------------------------------------------------------------
# a: correctness

def left_pad_mask(B, S, g, min_real=1, full_row=None):
    """(B, S) bool, True = real key, padding on the left, random real lengths in [min_real, S]."""
    lengths = torch.randint(min_real, S + 1, (B,), generator=g)
    lengths[0] = max(min_real, S - 10)  # row 0: its first 10 queries see nothing under a causal mask
    mask = torch.arange(S)[None, :] >= S - lengths[:, None]
    return mask.to(DEV)


def make(B, Hq, Hkv, T, S, D, layout, g, dtype=BF16):
    if layout == "model":  # transposed views of (B, T, H, D) projections, as model.py passes them
        q = torch.randn(B, T, Hq, D, generator=g).to(DEV, dtype).transpose(1, 2)
        k = torch.randn(B, S, Hkv, D, generator=g).to(DEV, dtype).transpose(1, 2)
        v = torch.randn(B, S, Hkv, D, generator=g).to(DEV, dtype).transpose(1, 2)
    elif layout == "cache":  # KVCache: a slice of a (B, Hkv, max_len, D) buffer
        q = torch.randn(B, T, Hq, D, generator=g).to(DEV, dtype).transpose(1, 2)
        buf = torch.randn(2, B, Hkv, S + 40, D, generator=g).to(DEV, dtype)
        k, v = buf[0, :, :, :S], buf[1, :, :, :S]
    else:
        q = torch.randn(B, Hq, T, D, generator=g).to(DEV, dtype)
        k = torch.randn(B, Hkv, S, D, generator=g).to(DEV, dtype)
        v = torch.randn(B, Hkv, S, D, generator=g).to(DEV, dtype)
    do = torch.randn(B, Hq, T, D, generator=g).to(DEV, dtype)
    return q, k, v, do


def fwd_bwd(fn, q, k, v, do, grad=True, **kw):
    q, k, v = (x.detach().clone().requires_grad_(grad) for x in (q, k, v))
    if not grad:
        with torch.no_grad():
            return fn(q, k, v, **kw), None
    out = fn(q, k, v, **kw)
    return out, torch.autograd.grad(out, (q, k, v), do.to(out.dtype))


def err(a, b):
    return (a.float() - b.float()).abs().max().item()


HEADS = (32, 8, 128) if not DRY else (2, 1, 16)  # Hq, Hkv, D: Mistral-7B (tiny on a dry run)
if CUDA:
    CASES_A = [  # name, B, T, S, causal, padding, layout, grad
        ("T256-causal-leftpad-model", 8, 256, 256, True, True, "model", True),
        ("T1000-causal-leftpad-model", 2, 1000, 1000, True, True, "model", True),
        ("T1024-full-nomask", 2, 1024, 1024, False, False, "contig", True),
        ("T4096-causal-nomask", 1, 4096, 4096, True, False, "contig", True),
        ("T4096-full-leftpad", 1, 4096, 4096, False, True, "contig", True),
        ("clara-doc-267-causal-leftpad", 16, 267, 267, True, True, "model", True),
        ("cache-T64-S300-causal-leftpad", 2, 64, 300, True, True, "cache", True),
        ("decode-T1-S300-leftpad", 4, 1, 300, True, True, "cache", False),
    ]
else:
    CASES_A = [  # a dry run checks the mechanics under the Triton interpreter: tiny, few
        ("T33-full-nomask", 1, 33, 33, False, False, "contig", True),
        ("clara-doc-27-causal-leftpad", 2, 27, 27, True, True, "model", True),
        ("decode-T1-S37-leftpad", 2, 1, 37, True, True, "cache", False),
    ]
TOKENS_B = 16384 if not DRY else 64
SEQS_B = [512, 1024, 2048, 4096, 8192] if not DRY else [32]
DOC_T = 259 if not DRY else 19  # CLaRa compressor: doc_max_length 256 + 3 special tokens, then n_mem
N_MEM_B = [8, 2, 16] if not DRY else [8]


def prewarm_spec():
    """Every (shape, mask, layout) the parts below launch, as aot_compile.py --spec entries. Triton
    specialises on integers == 1 and % 16 == 0 (T, S, H_Q, strides...), so these are the exact values."""
    H, KV, D = HEADS
    spec = []
    for (name, B, T, S, causal, pad, layout, grad) in CASES_A:
        spec.append(dict(name=name, B=B, Hq=H, Hkv=KV, T=T, S=S, D=D, causal=causal, padded=pad, layout=layout))
    spec.append(dict(name="fp32-T300", B=2, Hq=H, Hkv=KV, T=300, S=300, D=D, causal=True, padded=True,
                     layout="model", dtype="fp32"))
    for seq in SEQS_B:
        for causal in (True, False):
            spec.append(dict(name=f"b-{seq}-{causal}", B=max(1, TOKENS_B // seq), Hq=H, Hkv=KV, T=seq, S=seq, D=D,
                             causal=causal, padded=False, layout="contig"))
    # part d's prefill of a 128-token prompt into the KV cache (decoding itself is kernels.decode_attention,
    # SDPA, no Triton kernel), and the project's GPU tests (Hq 8 / Hkv 2)
    spec.append(dict(name="prefill-T128", B=1, Hq=H, Hkv=KV, T=128, S=128, D=D, causal=True, padded=True,
                     layout="cache"))
    spec.append(dict(name="test-gpu-causal", B=2, Hq=8, Hkv=2, T=1000, S=1000, D=128, causal=True, padded=True,
                     layout="contig"))
    spec.append(dict(name="test-gpu-full", B=2, Hq=8, Hkv=2, T=1000, S=1000, D=128, causal=False, padded=True,
                     layout="contig"))
    spec.append(dict(name="test-gpu-determinism", B=2, Hq=8, Hkv=2, T=300, S=300, D=64, causal=True, padded=False,
                     layout="contig"))
    return spec


def part_p(st, md, end):
    """Compile every kernel variant the checks will launch, in parallel processes, into the Triton cache."""
    cap = "%d%d" % torch.cuda.get_device_capability() if CUDA else "90"  # dry run: exercise the mechanics
    spec_path = os.path.join(ARGS.out, "prewarm_spec.json")
    with open(spec_path, "w") as f:
        json.dump(prewarm_spec() if CUDA else prewarm_spec()[:1], f)  # dry run: only check the mechanics
    n = max(1, min(14, (os.cpu_count() or 2) - 2))
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONDONTWRITEBYTECODE="1")
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, os.path.join(here, "aot_compile.py"), "--root", ROOT, "--caps", cap,
                               "--spec", spec_path, "--shard", f"{i}/{n}", "--no-usage",
                               "--json", os.path.join(ARGS.out, f"prewarm_{i}.json"),
                               *([] if CUDA else ["--max-configs", "1"])],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    errs = []
    try:
        for pr in procs:
            try:
                _, e = pr.communicate(timeout=max(1, end - time.time() - 2))
                if pr.returncode:
                    errs.append(e[-500:])
            except subprocess.TimeoutExpired:
                pr.kill()
                errs.append("timeout")
    finally:
        for pr in procs:  # ours, by handle: nothing is left compiling behind the next parts
            if pr.poll() is None:
                pr.kill()
                pr.wait()
    ok = total = 0
    for i in range(n):
        try:
            rows = json.load(open(os.path.join(ARGS.out, f"prewarm_{i}.json")))
            total += len(rows)
            ok += sum(r["ok"] for r in rows)
            os.remove(os.path.join(ARGS.out, f"prewarm_{i}.json"))
        except Exception:  # noqa: BLE001
            pass
    st.update(processes=n, compiles=total, compiled_ok=ok, wall_s=round(time.time() - t0, 1), errors=errs[:3])
    md.append(f"{total} kernel compiles ({ok} ok) in {n} processes: {time.time() - t0:.0f} s wall. "
              f"Errors: {errs[:3] or 'none'}")
    log(json.dumps({k: v for k, v in st.items() if k != "status"}))


def part_cold(st, md, end):
    """Cold first call (compile + autotune, nothing cached) of fwd+bwd at the CLaRa document shape."""
    import kernels.flash as flash
    from kernels.flash import flash_attention
    H, KV, D = HEADS
    g = torch.Generator().manual_seed(1)
    B, T = (16 if CUDA else 2, DOC_T + 8)
    q, k, v, do = make(B, H, KV, T, T, D, "model", g)
    kpm = left_pad_mask(B, T, g)
    t0 = time.time()
    out = flash_attention(q, k, v, causal=True, key_padding_mask=kpm)
    sync()
    t1 = time.time()
    qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
    flash_attention(qq, kk, vv, causal=True, key_padding_mask=kpm).backward(do)
    sync()
    t2 = time.time()
    st.update(fwd_first_call_s=round(t1 - t0, 2), bwd_first_call_s=round(t2 - t1, 2), shape=f"B{B} T{T} H{H}/{KV} D{D}")
    md.append(f"CLaRa document shape B{B} x T{T}, causal + key padding, nothing cached: first forward "
              f"{t1 - t0:.1f} s ({len(flash.FWD_CONFIGS)} configs compiled + benchmarked), first backward "
              f"{t2 - t1:.1f} s ({len(flash.DKDV_CONFIGS) + len(flash.DQ_CONFIGS)} configs, fewer for short "
              f"sequences). Every new (mask kind, integer specialisation) pays this once per process; a new "
              f"power-of-two length bucket pays the benchmarking again.")
    log(json.dumps(st))
    del out


def part_a(st, md, end):
    import kernels
    import kernels.flash as flash
    from kernels.flash import attention_reference, flash_attention
    g = torch.Generator().manual_seed(0)
    H, KV, D = HEADS
    cases = CASES_A
    rows = st.setdefault("cases", [])
    md.append("Errors are max |x - fp32 reference| over out, dQ, dK, dV; 'ok' = kernel error <= 2 x SDPA-bf16 "
              "error + 2 bf16 ulps of max|ref| (the project's test convention, with SDPA as the baseline).\n")
    md.append("| case | out kernel / sdpa | dq kernel / sdpa | dk kernel / sdpa | dv kernel / sdpa | NaN | "
              "zero rows ok | deterministic | ok |")
    md.append("|---|---|---|---|---|---|---|---|---|")
    for (name, B, T, S, causal, pad, layout, grad) in cases:
        if time.time() > end - 5:
            break
        t0 = time.time()
        row = dict(case=name, B=B, Hq=H, Hkv=KV, T=T, S=S, D=D, causal=causal, padded=pad, layout=layout)
        with recorded(row):
            q, k, v, do = make(B, H, KV, T, S, D, layout, g)
            kpm = left_pad_mask(B, S, g) if pad else None
            kw = dict(causal=causal, key_padding_mask=kpm)
            t1 = time.time()
            out_k, gr_k = fwd_bwd(flash_attention, q, k, v, do, grad, **kw)
            sync()
            row["first_call_s"] = round(time.time() - t1, 2)
            out_r, gr_r = fwd_bwd(attention_reference, q.float(), k.float(), v.float(), do.float(), grad, **kw)
            out_s, gr_s = fwd_bwd(kernels.sdpa_attention, q, k, v, do, grad, **kw)
            names = ["out", "dq", "dk", "dv"] if grad else ["out"]
            got = [out_k, *(gr_k or [])]
            base = [out_s, *(gr_s or [])]
            want = [out_r, *(gr_r or [])]
            ok = True
            for n, a, b, w in zip(names, got, base, want):
                ek, es = err(a, w), err(b, w)
                slack = 2 * torch.finfo(BF16).eps * w.abs().max().item()
                row[f"{n}_err_kernel"], row[f"{n}_err_sdpa"] = ek, es
                row[f"{n}_ok"] = ek <= 2 * es + slack
                ok &= row[f"{n}_ok"]
            row["nan"] = any(bool(torch.isnan(x).any()) for x in got)
            ok &= not row["nan"]
            if pad and causal and T == S:
                # queries inside the left padding see no key: zeros, and no gradient to them
                vis = kernels.visibility_mask(T, S, DEV, causal, None, kpm)  # (B, 1, T, S)
                empty = ~vis.any(-1, keepdim=True)  # (B, 1, T, 1)
                zr = bool((out_k.masked_select(empty) == 0).all())
                if grad:
                    zr &= bool((gr_k[0].masked_select(empty) == 0).all())
                row["zero_rows_ok"] = zr
                row["n_empty_rows"] = int(empty.sum())
                ok &= zr
            if grad:
                _, gr_k2 = fwd_bwd(flash_attention, q, k, v, do, grad, **kw)
                row["deterministic"] = all(torch.equal(a, b) for a, b in zip(gr_k, gr_k2))
                ok &= row["deterministic"]
            row["ok"] = bool(ok)
            del out_k, gr_k, out_r, gr_r, out_s, gr_s
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        log(json.dumps(row))

        def pair(n):
            if f"{n}_err_kernel" not in row:
                return "-"
            return f"{row[f'{n}_err_kernel']:.2e} / {row[f'{n}_err_sdpa']:.2e}"
        md.append(f"| {name} | {pair('out')} | {pair('dq')} | {pair('dk')} | {pair('dv')} | {row.get('nan', '-')} | "
                  f"{row.get('zero_rows_ok', '-')} | {row.get('deterministic', '-')} | "
                  f"{'ok' if row.get('ok') else 'FAIL ' + row.get('error', '')[:80]} |")
        save()
        if CUDA:
            torch.cuda.empty_cache()

    # > 2^31 elements: int64 offsets (the last batch element is where an int32 overflow would land)
    if CUDA and time.time() < end - 25:
        row = dict(case="int64-offsets: B136 x Hq32 x T4096 x D128 = 2.28e9 elements, causal")
        t0 = time.time()
        with recorded(row):
            Bb, T = 136, 4096
            assert Bb * H * T * D > 2**31
            q = torch.randn(Bb, H, T, D, device=DEV, dtype=BF16)
            k = torch.randn(Bb, KV, T, D, device=DEV, dtype=BF16)
            v = torch.randn(Bb, KV, T, D, device=DEV, dtype=BF16)
            do = torch.randn(Bb, H, T, D, device=DEV, dtype=BF16)
            qq, kk, vv = (x.requires_grad_(True) for x in (q, k, v))
            out = flash_attention(qq, kk, vv, causal=True)
            dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), do)
            sl = slice(Bb - 1, Bb)
            o_r, g_r = fwd_bwd(attention_reference, q[sl].float(), k[sl].float(), v[sl].float(), do[sl].float(),
                               True, causal=True)
            o_s, g_s = fwd_bwd(kernels.sdpa_attention, q[sl], k[sl], v[sl], do[sl], True, causal=True)
            for n, a, b, w in zip(["out", "dq", "dk", "dv"], [out[sl], dq[sl], dk[sl], dv[sl]], [o_s, *g_s], [o_r, *g_r]):
                row[f"{n}_err_kernel"], row[f"{n}_err_sdpa"] = err(a, w), err(b, w)
                row[f"{n}_ok"] = err(a, w) <= 2 * err(b, w) + 2 * torch.finfo(BF16).eps * w.abs().max().item()
            row["ok"] = all(row[f"{n}_ok"] for n in ["out", "dq", "dk", "dv"])
            del q, k, v, do, qq, kk, vv, out, dq, dk, dv
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        log(json.dumps(row))
        md.append(f"| {row['case']} | {row.get('out_err_kernel', '-')} | {row.get('dq_err_kernel', '-')} | "
                  f"{row.get('dk_err_kernel', '-')} | {row.get('dv_err_kernel', '-')} | - | - | - | "
                  f"{'ok' if row.get('ok') else 'FAIL ' + row.get('error', '')[:80]} |")
        save()
        torch.cuda.empty_cache()

    # fp32 inputs at D = 128 (autotuner must skip configs whose fp32 tiles overflow shared memory)
    if time.time() < end - 10:
        row = dict(case=f"fp32 D{D} T{300 if CUDA else 20} causal leftpad")
        with recorded(row):
            q, k, v, do = make(2, H, KV, 300 if CUDA else 20, 300 if CUDA else 20, D, "model", g, torch.float32)
            kpm = left_pad_mask(2, q.shape[2], g)
            out_k, gr_k = fwd_bwd(flash_attention, q, k, v, do, True, causal=True, key_padding_mask=kpm)
            out_r, gr_r = fwd_bwd(attention_reference, q, k, v, do, True, causal=True, key_padding_mask=kpm)
            row["max_err"] = max(err(a, b) for a, b in zip([out_k, *gr_k], [out_r, *gr_r]))
            row["ok"] = row["max_err"] < 1e-4
        rows.append(row)
        log(json.dumps(row))
        md.append(f"| {row['case']} | max err {row.get('max_err', '-')} | | | | | | | "
                  f"{'ok' if row.get('ok') else 'FAIL ' + row.get('error', '')[:80]} |")

    # dispatcher: default backend on this device, and what it does with unsupported inputs
    disp = st.setdefault("dispatcher", {})
    calls = []
    real = flash.flash_attention

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    env_saved = os.environ.pop("CLARA_ATTENTION", None)
    flash.flash_attention = spy
    try:
        # a variant part p already compiled (Hq 32 / Hkv 8 / D 128, T % 16 == 0, causal, no mask)
        q = torch.randn(1, H, 256 if CUDA else 32, D, device=DEV, dtype=BF16)
        kv = torch.randn(1, KV, q.shape[2], D, device=DEV, dtype=BF16)
        kernels.attention(q, kv, kv)
        disp["default_backend_on_" + DEV.type] = "triton" if calls else "sdpa"
        for label, shape, dt in [("head_dim 256 bf16", (1, 4, 16, 256), BF16), ("head_dim 8 bf16", (1, 4, 16, 8), BF16),
                                 ("float64", (1, 4, 16, 64), torch.float64), ("float32", (1, 4, 16, 64), torch.float32),
                                 ("batch x heads 65536 bf16", (16384, 4, 1, 64), BF16)]:
            x = torch.randn(*shape, device=DEV, dtype=dt)
            n0 = len(calls)
            try:
                kernels.attention(x, x, x)
                disp[label] = "ran via " + ("triton" if len(calls) > n0 else "sdpa")
            except Exception as e:  # noqa: BLE001
                disp[label] = f"raised {type(e).__name__}: {str(e)[:120]}"
    finally:
        flash.flash_attention = real
        if env_saved is not None:
            os.environ["CLARA_ATTENTION"] = env_saved
    want = {"head_dim 256 bf16": "ran via sdpa", "head_dim 8 bf16": "ran via sdpa", "float64": "ran via sdpa",
            "float32": "ran via sdpa", "batch x heads 65536 bf16": "ran via sdpa"}
    disp["as_documented"] = all(disp.get(k_) == v_ for k_, v_ in want.items()) and \
        disp["default_backend_on_" + DEV.type] == ("triton" if CUDA else "sdpa")
    log(json.dumps(disp, indent=1))
    md.append("\nDispatcher (`kernels.attention`, CLARA_ATTENTION unset; the rules: kernels/__init__.py):\n")
    for k_, v_ in disp.items():
        md.append(f"- {k_}: {v_}")
    st["all_ok"] = all(r.get("ok") for r in rows) and disp["as_documented"]
    if not st["all_ok"]:
        raise RuntimeError("part a: a correctness case or the dispatcher failed (see the table)")


# ----------------------------------------------------------------------------------------------------
# b: speed

def sdpa_flash_fn(causal, q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = SDPBackend.FLASH_ATTENTION

    def run(q, k, v, gqa):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    try:
        run(q, k, v, True)
        return (lambda q, k, v: run(q, k, v, True)), k, v, False
    except RuntimeError:
        grp = q.shape[1] // k.shape[1]
        k2, v2 = k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1)
        return (lambda q, k, v: run(q, k, v, False)), k2, v2, True


def time_pair(fn, q, k, v, do):
    with torch.no_grad():
        fwd = bench_ms(lambda: fn(q, k, v))
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    both = bench_ms(lambda: fn(q, k, v).backward(do), grads=(q, k, v))
    return fwd, both


def tf(flops, ms):
    return flops / (ms * 1e-3) / 1e12


def part_b(st, md, end):
    import kernels
    import kernels.flash as flash
    from kernels.flash import flash_attention
    H, KV, D = HEADS
    tokens, seqs = TOKENS_B, SEQS_B
    rows = st.setdefault("plain", [])
    md.append(f"TFLOP/s (higher is better), bf16, Hq {H} / Hkv {KV} / D {D}, batch x seq = {tokens}. FLOPs = "
              "4*B*Hq*T*S*D (x0.5 causal); fwd+bwd = 3.5x fwd (padding not discounted).\n")
    md.append("| seq | B | causal | kernel fwd | SDPA flash fwd | kernel fwd+bwd | SDPA flash fwd+bwd | "
              "kernel/SDPA fwd | kernel/SDPA fwd+bwd | first call s |")
    md.append("|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|")
    for seq in seqs:
        for causal in (True, False):
            if time.time() > end - 8:
                break
            B = max(1, tokens // seq)
            row = dict(seq=seq, B=B, causal=causal)
            with recorded(row, mark_failed=False):
                q = torch.randn(B, H, seq, D, device=DEV, dtype=BF16)
                k = torch.randn(B, KV, seq, D, device=DEV, dtype=BF16)
                v = torch.randn_like(k)
                do = torch.randn_like(q)
                flops = 4 * B * H * seq * seq * D * (0.5 if causal else 1.0)
                kf = lambda q, k, v: flash_attention(q, k, v, causal=causal)  # noqa: E731
                t0 = time.time()
                qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
                kf(qq, kk, vv).backward(do)
                sync()
                row["first_call_s"] = round(time.time() - t0, 2)
                tk_f, tk_b = time_pair(kf, q, k, v, do)
                sf, k2, v2, rep = sdpa_flash_fn(causal, q, k, v)
                ts_f, ts_b = time_pair(sf, q, k2, v2, do)
                row.update(kernel_fwd_tflops=tf(flops, tk_f), sdpa_fwd_tflops=tf(flops, ts_f),
                           kernel_fwdbwd_tflops=tf(3.5 * flops, tk_b), sdpa_fwdbwd_tflops=tf(3.5 * flops, ts_b),
                           kernel_fwd_ms=tk_f, kernel_fwdbwd_ms=tk_b, sdpa_fwd_ms=ts_f, sdpa_fwdbwd_ms=ts_b,
                           sdpa_kv_repeated=rep)
                del q, k, v, do, qq, kk, vv, k2, v2
            add_row(rows, md, row, f"{seq} | {B} | {'yes' if causal else 'no'}",
                    lambda: f"{row['kernel_fwd_tflops']:.0f} | {row['sdpa_fwd_tflops']:.0f} | "
                            f"{row['kernel_fwdbwd_tflops']:.0f} | {row['sdpa_fwdbwd_tflops']:.0f} | "
                            f"{row['sdpa_fwd_ms'] / row['kernel_fwd_ms']:.2f} | "
                            f"{row['sdpa_fwdbwd_ms'] / row['kernel_fwdbwd_ms']:.2f} | {row['first_call_s']}")
            save()

    # CLaRa document shape: 259 text tokens + n_mem memory tokens, left padded to random lengths, causal
    crow = st.setdefault("clara", [])
    md.append("\nCLaRa compressor shape (left padded, causal, key padding mask). 'masked SDPA' is "
              "kernels.sdpa_attention (what the model runs with CLARA_ATTENTION=sdpa); 'SDPA flash, no mask' "
              "is the same shape without padding, as a speed reference only.\n")
    md.append("| n_mem | T | B | kernel fwd | masked SDPA fwd | SDPA flash no-mask fwd | kernel fwd+bwd | "
              "masked SDPA fwd+bwd | SDPA flash no-mask fwd+bwd |")
    md.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for n_mem in N_MEM_B:
        if time.time() > end - 8:
            break
        T = DOC_T + n_mem
        B = max(1, tokens // T)
        row = dict(n_mem=n_mem, T=T, B=B)
        failed = lambda: md.append(f"| {n_mem} | {T} | {B} | ERROR {row['error'][:100]} |")  # noqa: E731
        with recorded(row, failed, mark_failed=False):
            lengths = n_mem + torch.randint(1, T - n_mem + 1, (B,), generator=g)
            mask = (torch.arange(T)[None, :] >= T - lengths[:, None]).to(DEV)
            q = torch.randn(B, T, H, D, device=DEV, dtype=BF16).transpose(1, 2)  # model layout
            k = torch.randn(B, T, KV, D, device=DEV, dtype=BF16).transpose(1, 2)
            v = torch.randn(B, T, KV, D, device=DEV, dtype=BF16).transpose(1, 2)
            do = torch.randn(B, H, T, D, device=DEV, dtype=BF16)
            flops = 4 * B * H * T * T * D * 0.5
            t0 = time.time()
            qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
            flash_attention(qq, kk, vv, causal=True, key_padding_mask=mask).backward(do)
            sync()
            row["first_call_s"] = round(time.time() - t0, 2)
            a = time_pair(lambda q, k, v: flash_attention(q, k, v, causal=True, key_padding_mask=mask), q, k, v, do)
            b = time_pair(lambda q, k, v: kernels.sdpa_attention(q, k, v, causal=True, key_padding_mask=mask),
                          q, k, v, do)
            qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
            sf, k2, v2, _ = sdpa_flash_fn(True, qc, kc, vc)
            c = time_pair(sf, qc, k2, v2, do)
            row.update(kernel_fwd_tflops=tf(flops, a[0]), masked_sdpa_fwd_tflops=tf(flops, b[0]),
                       flash_nomask_fwd_tflops=tf(flops, c[0]), kernel_fwdbwd_tflops=tf(3.5 * flops, a[1]),
                       masked_sdpa_fwdbwd_tflops=tf(3.5 * flops, b[1]), flash_nomask_fwdbwd_tflops=tf(3.5 * flops, c[1]),
                       ms=dict(kernel=a, masked_sdpa=b, flash_nomask=c))
            md.append(f"| {n_mem} | {T} | {B} | {row['kernel_fwd_tflops']:.0f} | {row['masked_sdpa_fwd_tflops']:.0f} | "
                      f"{row['flash_nomask_fwd_tflops']:.0f} | {row['kernel_fwdbwd_tflops']:.0f} | "
                      f"{row['masked_sdpa_fwdbwd_tflops']:.0f} | {row['flash_nomask_fwdbwd_tflops']:.0f} |")
        crow.append(row)
        log(json.dumps(row, default=str))
        save()
    # which configs the autotuner chose
    picks = {}
    for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        kern = getattr(flash, name)
        cache = getattr(kern, "cache", None)
        if cache:
            picks[name] = {str(k_): str(v_) for k_, v_ in cache.items()}
    st["autotune_picks"] = picks
    if picks:
        md.append("\nAutotuner picks (key = T_BUCKET, S_BUCKET, HEAD_DIM, CAUSAL, HAS_WINDOW, dtypes...):\n")
        for name, d in picks.items():
            for k_, v_ in d.items():
                md.append(f"- {name} {k_}: {v_}")


# ----------------------------------------------------------------------------------------------------
# c, d: a 7B-shaped model, shared by the training step and the decode measurements

_MODEL = {}


def seven_b():
    """(Transformer, tokenizer, P) with random weights, built once: Mistral-7B on GPU, tiny on a dry run."""
    if "m" in _MODEL:
        return _MODEL["m"]
    from data import train_tokenizer
    from model import ModelConfig, Transformer
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_train import WORDS
    tok = train_tokenizer([" ".join(WORDS) * 3], 300)
    shape = "mistral-7b" if CUDA else "tiny"
    cfg = ModelConfig.from_preset(shape, vocab_size=32000 if CUDA else tok.vocab_size)
    t0 = time.time()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=DEV)
    model.init_weights().to(BF16 if CUDA else torch.float32)
    model.requires_grad_(False)
    sync()
    P_ = sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" not in n and "output" not in n)
    log(f"built {shape}: {P_ / 1e9:.2f}B non-embedding parameters in {time.time() - t0:.1f} s")
    _MODEL["m"] = (model, tok, P_, shape)
    return _MODEL["m"]


def part_c(st, md, end):
    """bench/bench_train.py's loop, in process, for each attention backend (stage 1, then stage 3)."""
    import random
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_train import bench_optimizer, fake_records, timed_step
    from clara import Clara, ClaraConfig
    from train import PEAK_BF16, mfu
    model, tok, P_, shape = seven_b()
    steps = 4 if CUDA else 1
    micro, cands = (2, 20) if CUDA else (2, 6)
    rows = st.setdefault("rows", [])
    md.append(f"{shape}, random weights, {'bf16' if CUDA else 'fp32'}, micro-batch {micro}, {cands} candidates, "
              f"{steps} timed steps after 1 warm-up, no activation checkpointing; figures of the median step. MFU = "
              f"train.batch_flops / time / 989 TFLOP/s (train.py's and bench/bench_train.py's "
              f"count, docs/training.md#mfu).\n")
    md.append("| attention | stage | samples/s | tokens/s | MFU | median step s | all steps s | warm-up step s | peak GiB |")
    md.append("|---|---|---:|---:|---:|---:|---|---:|---:|")
    clara = None
    # (a dry run skips triton here: the interpreter needs minutes for one tiny training step)
    for backend in (("triton", "sdpa") if CUDA else ("sdpa",)):
        os.environ["CLARA_ATTENTION"] = backend
        rng = random.Random(0)
        for stage in (1, 3):
            if time.time() > end - 10:
                break
            row = dict(attention=backend, stage=stage)
            with recorded(row, lambda: log(traceback.format_exc()), mark_failed=False):
                ccfg = ClaraConfig(compr_rate=32, training_stage=stage, max_len=2048 if stage == 1 else 1024)
                if clara is None:
                    clara = Clara(model, tok, ccfg)
                    clara.model.copy_adapter("encoder", "query")
                clara.cfg = ccfg
                opt = bench_optimizer(clara, stage, DEV)
                if CUDA:
                    torch.cuda.reset_peak_memory_stats()
                times, toks, flops, per_step = [], 0, 0, []
                for step in range(steps + 1):
                    records = fake_records(stage, micro, cands, rng)
                    dt, n, fl = timed_step(clara, opt, stage, records, sync)
                    if step == 0:
                        row["warmup_step_s"] = round(dt, 2)
                        continue
                    times.append(dt)
                    toks, flops = toks + n, flops + fl
                    per_step.append((dt, n, fl))
                    if time.time() > end - 5:
                        break
                # median step: a timed step can still meet a new Triton specialisation (T % 16) and compile
                per_step.sort(key=lambda x: x[0])
                dt_m, tok_m, fl_m = per_step[len(per_step) // 2]
                row.update(steps=len(times), step_times_s=[round(t, 3) for t in times], step_s=dt_m,
                           samples_s=micro / dt_m, tokens_s=tok_m / dt_m,
                           mfu=mfu(fl_m, dt_m, PEAK_BF16),
                           mean_tokens_s=toks / sum(times),
                           mean_mfu=mfu(flops, sum(times), PEAK_BF16),
                           peak_gib=torch.cuda.max_memory_allocated() / 2**30 if CUDA else None)
                del opt
            add_row(rows, md, row, f"{backend} | {stage}",
                    lambda: f"{row['samples_s']:.2f} | {row['tokens_s']:,.0f} | {row['mfu']:.1%} | "
                            f"{row['step_s']:.3f} | {row['step_times_s']} | {row['warmup_step_s']} | "
                            f"{row['peak_gib'] or 0:.1f}")
            save()
    os.environ.pop("CLARA_ATTENTION", None)
    if clara is not None:
        clara.zero_grad(set_to_none=True)
        clara.eval()


def part_d(st, md, end):
    from model import generate
    model, tok, P_, shape = seven_b()
    model.eval()
    prompt = 128 if CUDA else 16
    long_n, short_n = (128, 8) if CUDA else (8, 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.cfg.vocab_size, (1, prompt), generator=g).to(DEV)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gpu = torch.cuda.get_device_name() if CUDA else "cpu"
    bw = next((v for k, v in HBM_BW.items() if k in gpu), None)
    st.update(prompt=prompt, weight_gib=weight_bytes / 2**30,
              roofline_tokens_s=(bw / weight_bytes) if bw else None)
    md.append(f"{shape}, batch 1, {'bf16' if CUDA else 'fp32'}, prompt {prompt} tokens, greedy, no EOS; per-token time = "
              f"(t({long_n} new) - t({short_n} new)) / {long_n - short_n}. Weight-streaming roofline "
              f"{st['roofline_tokens_s'] or float('nan'):.0f} tokens/s ({weight_bytes / 2**30:.1f} GiB per token).\n")
    md.append(f"| attention (prefill) | decode tokens/s | ms/token | generate({long_n}) s | generate({short_n}) s | "
              "warm-up s |")
    md.append("|---|---:|---:|---:|---:|---:|")
    rows = st.setdefault("rows", [])
    variants = [("triton", False), ("sdpa", False)] + ([("sdpa", True)] if CUDA else [])
    tokens = {}  # attention -> the greedy tokens of its last long generation
    for backend, compiled in variants:
        os.environ["CLARA_ATTENTION"] = backend
        row = dict(attention=backend + (" + compile=True" if compiled else ""))
        failed = lambda: md.append(f"| {row['attention']} | ERROR {row['error'][:120]} |")  # noqa: E731
        with recorded(row, failed, mark_failed=False):
            # warm-up: the prefill, and decoding across S % 16 == 0 (both integer specialisations compiled);
            # compile=True: torch.compile + CUDA graph capture of the step (its seconds are reported)
            t = time.perf_counter()
            generate(model, ids, max_new_tokens=24 if CUDA else 3, eos_id=-1, compile=compiled)
            sync()
            row["warmup_s"] = round(time.perf_counter() - t, 1)
            best = {}
            for n in (short_n, long_n, short_n, long_n):
                if time.time() > end - 3:
                    break
                sync()
                t = time.perf_counter()
                out = generate(model, ids, max_new_tokens=n, eos_id=-1, compile=compiled)
                sync()
                best[n] = min(best.get(n, 1e9), time.perf_counter() - t)
                assert len(out[0]) == n
                if n == long_n:
                    tokens[row["attention"]] = out[0]
            if compiled and "sdpa" in tokens:  # greedy, same prompt: how many leading tokens agree with eager
                same = tokens["sdpa"], tokens[row["attention"]]
                row["tokens_equal_eager"] = next((i for i, (a_, b_) in enumerate(zip(*same)) if a_ != b_), len(same[0]))
            per_tok = (best[long_n] - best[short_n]) / (long_n - short_n)
            if per_tok <= 0:  # noise (CPU dry run): fall back to the plain average
                per_tok = best[long_n] / long_n
                row["noisy"] = True
            row.update(ms_per_token=1e3 * per_tok, tokens_s=1 / per_tok, t_long_s=best[long_n], t_short_s=best[short_n])
            md.append(f"| {row['attention']} | {row['tokens_s']:.1f} | {row['ms_per_token']:.2f} | {row['t_long_s']:.2f} | "
                      f"{row['t_short_s']:.2f} | {row['warmup_s']} |"
                      + (f" first {row['tokens_equal_eager']} of {long_n} tokens equal eager sdpa's |"
                         if "tokens_equal_eager" in row else ""))
        rows.append(row)
        log(json.dumps(row))
        save()
    os.environ.pop("CLARA_ATTENTION", None)
    if any("error" in r for r in rows):
        raise RuntimeError("part d: " + "; ".join(f"{r['attention']}: {r['error']}" for r in rows if "error" in r))


# ----------------------------------------------------------------------------------------------------
# e: the project's own tests of the kernel, on this device

def part_e(st, md, end):
    sel = "gpu or whole_model or dispatch"  # GPU-only kernel tests, the whole model on the kernel, the dispatcher
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "tests/test_flash.py",
           "tests/test_dispatch.py", "-k", sel]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("CLARA_ATTENTION", None)
    if not DRY:
        env.pop("TRITON_INTERPRET", None)
    budget = max(5, end - time.time() - 3)
    st["cmd"] = " ".join(cmd[1:])
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget)
        st["rc"] = r.returncode
        tail = (r.stdout + r.stderr)[-6000:]
    except subprocess.TimeoutExpired as e:
        st["rc"] = "timeout"
        tail = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))[-6000:]
    st["tail"] = tail
    log(tail)
    md.append(f"`{st['cmd']}` -> rc {st['rc']}\n")
    md.append("```\n" + "\n".join(tail.splitlines()[-25:]) + "\n```")
    if st["rc"] not in (0, "timeout"):
        raise RuntimeError(f"part e: the tests failed (rc {st['rc']})")


PARTS = {"env": (part_env, 20), "cold": (part_cold, 45), "p": (part_p, 60), "a": (part_a, 80),
         "b": (part_b, 100), "c": (part_c, 90), "d": (part_d, 50), "e": (part_e, 25)}


def main():
    RESULTS["meta"].update(dry_run=DRY, budget_s=ARGS.budget, root=os.path.basename(ROOT),
                           started=time.strftime("%Y-%m-%d %H:%M:%S"))
    order = [p for p in PARTS if p in ARGS.parts]
    for i, name in enumerate(order):
        fn, alloc = PARTS[name]
        later = sum(min(PARTS[n][1], 20) for n in order[i + 1:])  # keep a little for every later part
        budget = min(max(alloc, left() - sum(PARTS[n][1] for n in order[i + 1:])), left() - later)
        if budget < 5:
            RESULTS["parts"][name] = {"status": "skipped (no time left)"}
            save()
            continue
        run_part(name, fn, budget)
    RESULTS["meta"]["total_s"] = round(time.time() - T_START, 1)
    failed = [n for n, st in RESULTS["parts"].items() if st.get("status") == "error"]
    RESULTS["meta"]["failed_parts"] = failed
    save()
    log(f"\nwrote {os.path.join(ARGS.out, 'gpu_check.json')} and gpu_check.md in {time.time() - T_START:.0f} s; "
        f"{'FAILED parts: ' + ' '.join(failed) if failed else 'no part failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
