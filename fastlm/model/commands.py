"""`fastlm quantize`: write a weight-only quantized copy of a checkpoint (registered by fastlm/cli.py).

    fastlm quantize --model IN --out OUT --bits 8|4 [--group-size 128] [--quantize-head]

OUT gets config.json (with quantization_config), model.safetensors in the format of fastlm.model.quantize,
and IN's other files (tokenizer, generation_config.json); `fastlm.LLM(OUT)` and the commands' --model OUT
load it as it is.
"""
import shutil
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="write a weight-only int8/int4 copy of a checkpoint")
    p.add_argument("--model", required=True, help="checkpoint folder to quantize")
    p.add_argument("--out", required=True, help="new folder for the quantized checkpoint")
    p.add_argument("--bits", type=int, required=True, choices=(8, 4))
    p.add_argument("--group-size", type=int, default=None, help="int4: input columns per group (32, 64, 128; "
                                                                   "default 128)")
    p.add_argument("--quantize-head", action="store_true", help="also quantize the LM head")
    p.add_argument("--device", default="cpu", help="where to quantize (cpu, cuda, cuda:N)")
    p.set_defaults(func=run_quantize)


def run_quantize(args) -> int:
    from fastlm.model import Transformer
    from fastlm.model.devices import resolve_device
    from fastlm.model.model_path import resolve_model_path
    from fastlm.model.quantize import QuantConfig

    if args.bits == 8 and args.group_size is not None:
        raise ValueError("--group-size applies to --bits 4 only")
    qcfg = QuantConfig(args.bits, None if args.bits == 8 else (args.group_size or 128), args.quantize_head)
    src, out, device = resolve_model_path(args.model), Path(args.out), resolve_device(args.device)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; choose a new one")
    model = Transformer.from_pretrained(src, device=device, quantize=qcfg)
    model.save_pretrained(out)
    for file in sorted(src.iterdir()):  # tokenizer, generation config, ...: everything but weights and config
        if file.is_file() and file.name != "config.json" and not file.name.endswith(WEIGHT_SUFFIXES) \
                and not file.name.endswith(".index.json"):
            shutil.copy2(file, out / file.name)
    before = sum(f.stat().st_size for f in src.iterdir() if f.name.endswith(WEIGHT_SUFFIXES))
    after = (out / "model.safetensors").stat().st_size
    print(f"wrote {out}: {qcfg.name}{' with the LM head' if qcfg.quantize_head else ''}, "
          f"weight files {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
    return 0
