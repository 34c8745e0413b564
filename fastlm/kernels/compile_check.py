"""Ahead-of-time compile of every Triton kernel in fastlm.kernels, with no GPU and no driver.

Each private kernel module lists, as data, the configurations its launchers really use: `LAUNCHES`, a
list of fastlm.kernels._utils.Launch (kernel, dtype, constexprs, warps, stages, fp32/int32/int8/uint8
pointers, tensor cores expected, archs). A kernel module joins the check with one line in KERNEL_MODULES.
`spec()` below is the one place that turns a Launch into a Triton signature, by the house naming rule:
UPPERCASE parameters are pointers (of the launch's dtype unless listed as fp32/int32/int8/uint8), `eps` and
`*scale` are fp32 scalars, every other parameter an i32; pointers and strides carry the 16-divisibility
the runtime specializes them on. For each spec and target (sm_80, sm_90) we compile to a cubin and read
`cuobjdump --dump-resource-usage`
(registers, shared memory, STACK, LOCAL; non-zero STACK/LOCAL means register spills) and, where the
spec asks for tensor cores, grep the SASS for HMMA/HGMMA.

    python -m fastlm.kernels.compile_check          # prints the report, exits 1 on spills / missing MMA
    python -m fastlm.kernels.compile_check --json   # machine-readable, used by the test suite

Must run without TRITON_INTERPRET=1 (the interpreter replaces kernels by Python functions); the
command clears it and re-executes itself when it is set.
"""
import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

from fastlm.kernels import _decode, _flash, _norm, _paged, _quant  # the kernel modules this check builds

KERNEL_MODULES = [module.__name__ for module in (_norm, _flash, _decode, _paged, _quant)]
TARGETS = (80, 90)
POINTER_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "int32": "*i32", "int8": "*i8",
                 "uint8": "*u8"}
_POINTER_KINDS = {"fp32": "float32", "int32": "int32", "int8": "int8", "uint8": "uint8"}  # Launch field -> dtype


@dataclasses.dataclass
class KernelSpec:
    name: str  # a readable label: kernel + the configuration, e.g. "norm_fwd[rms,BLOCK=1x4096,bfloat16,w16]"
    fn: object  # the @triton.jit function
    signature: dict  # {"X": "*fp16", "n_cols": "i32", "BLOCK_N": "constexpr", ...}
    constexprs: dict  # {"BLOCK_N": 4096, ...}
    num_warps: int = 4
    num_stages: int = 3
    expect_mma: bool = False  # assert tensor-core instructions in the SASS
    attrs: dict = None  # ASTSource attrs, e.g. {(0,): [["tt.divisibility", 16]]}: the runtime's specialization
    targets: tuple = TARGETS  # the archs whose launcher picks this configuration


@dataclasses.dataclass
class CompileResult:
    name: str
    arch: int
    registers: int
    shared: int
    stack: int
    local: int
    mma: str  # tensor-core instructions found ("HMMA", "HGMMA", "" for none)
    expect_mma: bool

    @property
    def ok(self) -> bool:
        return self.stack == 0 and self.local == 0 and (self.mma != "" or not self.expect_mma)


def _nvidia_bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _resource_usage(cubin_path: str) -> dict:
    out = subprocess.run([_nvidia_bin("cuobjdump"), "--dump-resource-usage", cubin_path],
                         capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in fields.items()}


def _mma_kind(cubin_path: str) -> str:
    sass = subprocess.run([_nvidia_bin("cuobjdump"), "--dump-sass", cubin_path],
                          capture_output=True, text=True, check=True).stdout
    found = [op for op in ("HGMMA", "HMMA") if re.search(rf"\b{op}\b", sass)]
    return "+".join(found)


def compile_spec(spec: KernelSpec, arch: int) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = _resource_usage(f.name)
        mma = _mma_kind(f.name) if spec.expect_mma else ""
    return CompileResult(spec.name, arch, usage.get("REG", 0), kernel.metadata.shared,
                         usage.get("STACK", 0), usage.get("LOCAL", 0), mma, spec.expect_mma)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def spec(launch) -> KernelSpec:
    """The compile spec of one fastlm.kernels._utils.Launch (the naming rule is in the module docstring)."""
    signature, attrs = {}, {}
    for i, arg in enumerate(launch.kernel.arg_names):
        if arg in launch.constexprs:
            signature[arg] = "constexpr"
        elif arg.isupper():
            dtype = next((d for field, d in _POINTER_KINDS.items() if arg in getattr(launch, field)),
                         _dtype_name(launch.dtype))
            signature[arg] = POINTER_TYPES[dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg == "eps" or arg.endswith("scale"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    name = f"{launch.kernel.__name__.lstrip('_')}[{launch.tag},{_dtype_name(launch.dtype)},w{launch.num_warps}]"
    return KernelSpec(name, launch.kernel, signature, dict(launch.constexprs), launch.num_warps, launch.num_stages,
                      launch.mma, attrs, tuple(launch.targets))


def all_specs(modules=KERNEL_MODULES):
    """One spec per distinct launch of the modules' LAUNCHES."""
    specs = {}
    for module_name in modules:
        for launch in sys.modules[module_name].LAUNCHES:
            s = spec(launch)
            specs.setdefault(s.name, s)
    return list(specs.values())


def compile_all(name_filter: str = "", modules=KERNEL_MODULES):
    return [compile_spec(s, arch) for s in all_specs(modules) if name_filter in s.name
            for arch in TARGETS if arch in s.targets]


def _print_report(results):
    print(f"{'kernel':<58} {'sm':>3} {'regs':>5} {'shared':>7} {'stack':>6} {'local':>6} {'mma':>10}  ok")
    for r in results:
        print(f"{r.name:<58} {r.arch:>3} {r.registers:>5} {r.shared:>7} {r.stack:>6} {r.local:>6} "
              f"{r.mma or '-':>10}  {'yes' if r.ok else 'NO'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print results as JSON lines")
    parser.add_argument("--filter", default="", help="only kernels whose label contains this")
    parser.add_argument("--module", action="append", choices=KERNEL_MODULES,
                        help="only this kernel module (repeatable)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter would hide the real kernels
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "fastlm.kernels.compile_check"] + (argv if argv is not None else sys.argv[1:])
        return subprocess.run(cmd, env=env).returncode
    results = compile_all(args.filter, args.module or KERNEL_MODULES)
    if args.json:
        for r in results:
            print(json.dumps(dict(dataclasses.asdict(r), ok=r.ok)))
    else:
        _print_report(results)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
