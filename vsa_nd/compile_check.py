"""Compile every CUDA kernel instantiation with NVRTC, for sm_80 and sm_90a; no GPU needed.

``python -m vsa_nd.compile_check`` uses the same sources and options as the run-time
loader, prints registers, shared memory and spills per kernel (flagging any spill: their
size depends on the NVRTC version, e.g. a few bytes in the D = 128 dK/dV kernels with
NVRTC 13.0 and none with 13.5), and exits non-zero on any compile error or on any kernel
whose warpgroup MMAs ptxas serialized (its "wgmma.mma_async instructions are serialized due
to ..." notes, C7509-C7518: the kernel would still be right, but each wgmma would wait for
the one before, which undoes the pipelining the sm_90a kernels are written for).  Exits with 2,
saying what to install, where neither CuPy nor cuda-bindings is there to reach NVRTC.
"""

from __future__ import annotations

import re
import sys

from .kernels import catalogue, compile_spec, nvrtc_version

ARCHES = ("sm_80", "sm_90a")
_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_SERIALIZED = re.compile(r"wgmma.mma_async instructions are serialized (due to [^']*?)\s*(?:for|in) the function '(\w+)'")


def serialized_wgmma(log: str) -> dict:
    """{mangled kernel name: reason} for each kernel whose wgmma ptxas serialized."""
    return {m.group(2): " ".join(m.group(1).split()) for m in _SERIALIZED.finditer(log)}


def resource_report(log: str) -> list:
    """[(mangled kernel name, registers, static smem bytes, stack bytes, spill stores, spill loads)] from a ptxas -v log."""
    rows, current = [], None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = [m.group(1), 0, 0, 0, 0, 0]
            rows.append(current)
        elif current is not None and (m := _SPILL.search(line)):
            current[3:6] = [int(g) for g in m.groups()]
        elif current is not None and (m := _REGS.search(line)):
            current[1] = int(m.group(1))
            if s := _SMEM.search(line):
                current[2] = int(s.group(1))
    return [tuple(r) for r in rows]


def main() -> int:
    try:
        version = nvrtc_version()
    except ImportError as e:  # neither CuPy nor cuda-bindings
        print(f"compile check: no NVRTC to compile with ({e}); it comes with CuPy (pip install "
              "'vsa_nd[cuda13]' or 'vsa_nd[cuda12]') or with cuda-bindings and the NVRTC wheel (pip "
              "install 'vsa_nd[test]')", file=sys.stderr)
        return 2
    print(f"NVRTC {version}")
    failures = 0
    for arch in ARCHES:
        for spec in catalogue():
            if not spec.builds_for(arch):
                continue
            try:
                _, lowered, log = compile_spec(spec, arch, verbose=True)
            except RuntimeError as e:  # CompileError, or no CUDA headers found
                print(f"FAIL {arch} {spec.source}\n{e}")
                failures += 1
                continue
            demangled = {v: k for k, v in lowered.items()}
            for name, reason in serialized_wgmma(log).items():
                print(f"FAIL {arch} {spec.source} {demangled.get(name, name)}: wgmma serialized {reason}")
                failures += 1
            for name, regs, smem, stack, spill_st, spill_ld in resource_report(log):
                label = demangled.get(name, name)
                spilled = spill_st or spill_ld
                flag = "SPILL" if spilled else "ok"
                print(f"{flag:5} {arch:7} {spec.source:18} {label:42} regs={regs:3} smem={smem:6} "
                      f"stack={stack} spill_st={spill_st} spill_ld={spill_ld}")
    print("compile check:", "FAILED" if failures else "all kernels compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
