"""Load HF checkpoints into a Transformer, and save a Transformer back in HF format.

Loading never holds two full copies of the weights: the model is built on the meta device, every
checkpoint tensor is checked (names and shapes, from the safetensors headers) before any data is
read, then each parameter is allocated once in the target dtype/device, its HF tensors are read into it
(fused q/k/v and gate/up parts into row blocks, GPT-2 Conv1D transposed), and it is assigned into the
model with `load_state_dict(assign=True)`. Any problem raises one error naming the file or tensor; a model is
returned only when every parameter was loaded. A checkpoint in fastlm's quantized format
(fastlm.model.quantize) gets QuantLinear layers whose integer weights and fp32 scales load as stored."""
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastlm.kernels.quant import QuantEmbedding
from fastlm.model import hugepages
from fastlm.model.checkpoint_files import open_checkpoint
from fastlm.model.config import ModelConfig
from fastlm.model.quantize import (QuantConfig, parse_quantize, prepare_quantized, quantize_model, quantized_entries,
                                   read_quant_config, tie_quantized_head)
from fastlm.model.weight_map import IGNORED_HF, hf_shapes, normalize_hf_name, weight_map

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(dtype, checkpoint_dtype=None) -> torch.dtype:
    """dtype argument -> torch dtype; None means the checkpoint's torch_dtype, else float32."""
    if dtype is None:
        return DTYPES.get(str(checkpoint_dtype).replace("torch.", ""), torch.float32)
    if isinstance(dtype, str):
        if dtype.replace("torch.", "") not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch dtype, got {dtype!r}")
        return DTYPES[dtype.replace("torch.", "")]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype!r}")
    return dtype


def load_pretrained(cls, path, dtype=None, device=None, quantize=None):
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    if quantize is not None:
        return _load_quantizing(cls, folder, dtype, device, quantize)
    cfg = ModelConfig.from_hf(folder)
    dtype = resolve_dtype(dtype, cfg.torch_dtype)
    device = torch.device("cpu" if device is None else device)
    quant_config = read_quant_config(folder)
    with torch.device("meta"):
        model = cls(cfg)
        if quant_config is not None:
            prepare_quantized(model, quant_config, dtype)
    entries = model_weight_map(model)
    with open_checkpoint(folder) as ckpt:
        names = {normalize_hf_name(cfg, n): n for n in ckpt.names}  # normalized -> name in the file
        _check_names_and_shapes(cfg, entries, model, ckpt, names)
        params = dict(model.named_parameters(remove_duplicate=False))
        targets = dict(params, **dict(model.named_buffers()))
        state = {}
        # each parameter allocated once (on CPU in huge pages, see hugepages.py), its HF parts copied into
        # row blocks; parameters take the requested dtype, quantized buffers (int weights, fp32 scales) theirs
        specs = [(targets[e.ours].shape, dtype if e.ours in params else targets[e.ours].dtype) for e in entries]
        for entry, tensor in zip(entries, hugepages.empty_tensors(specs, device)):
            for hf_name, rows in zip(entry.hf, tensor.split(list(entry.sizes), dim=0)):
                ckpt.copy_into(names[hf_name], rows, transpose=entry.transpose)
            state[entry.ours] = tensor
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if cfg.tie_embeddings:
        tie_head(model)
    if model.rotary is not None:
        model.rotary.reset(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # cannot happen when the weight map is complete; guards against returning a half-built model
        raise ValueError(f"internal error: parameters not loaded from {folder}: {left[:5]}")
    return model.eval()


def model_weight_map(model):
    """weight_map of the model's config, with the quantized layers' tensors when it has any."""
    entries = weight_map(model.config)
    return entries if getattr(model, "quant_config", None) is None else quantized_entries(entries, model)


def _load_quantizing(cls, folder, dtype, device, quantize):
    """Quantize while loading (`quantize`: "int8", "int4", "int4-g32", ... or a QuantConfig). The weights are
    quantized as the checkpoint stores them (its own dtype), exactly as `fastlm quantize` does, so both
    give the same model; then the float tensors left take `dtype`."""
    qcfg = quantize if isinstance(quantize, QuantConfig) else parse_quantize(quantize)
    stored = read_quant_config(folder)
    if stored is not None:
        if stored != qcfg:
            raise ValueError(f"checkpoint {folder} is already quantized ({stored.name}, quantize_head="
                             f"{stored.quantize_head}); load it without quantize= (asked for {qcfg.name})")
        return load_pretrained(cls, folder, dtype, device)
    model = quantize_model(load_pretrained(cls, folder, None, device), qcfg)
    target = resolve_dtype(dtype, model.config.torch_dtype)
    for p in model.parameters():
        p.data = p.data.to(target)
    if isinstance(model.tok_emb, QuantEmbedding):
        model.tok_emb.dtype = target
    hugepages.pack_module(model)  # the quantized tensors are new allocations
    return model


def tie_head(model):
    """A tied LM head reads the token embedding's tensors (float or quantized)."""
    if isinstance(model.tok_emb, QuantEmbedding):
        tie_quantized_head(model)
    else:
        model.lm_head.weight = model.tok_emb.weight


def _check_names_and_shapes(cfg, entries, model, ckpt, names):
    ours = dict(model.named_parameters(remove_duplicate=False), **dict(model.named_buffers()))
    expected, integer = {}, {}
    for entry in entries:
        for hf_name, shape in zip(entry.hf, hf_shapes(entry, ours[entry.ours].shape)):
            expected[hf_name] = shape
            if not ours[entry.ours].is_floating_point():
                integer[hf_name] = ours[entry.ours].dtype
    missing = [n for n in expected if n not in names]
    if missing:
        raise ValueError(f"checkpoint {ckpt.describe()} is missing tensor(s) {_few(missing)} "
                         f"required by its config ({cfg.model_type}, {cfg.n_layer} layers)")
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()  # HF ignores a stored copy of a tied head
    unexpected = [names[n] for n in names if n not in expected and n not in optional and not IGNORED_HF.search(n)]
    if unexpected:
        raise ValueError(f"checkpoint {ckpt.describe()} has unexpected tensor(s) {_few(unexpected)} "
                         f"(in {ckpt.file_of(unexpected[0])}) for a {cfg.model_type} config")
    for hf_name, shape in expected.items():
        got = tuple(ckpt.shape(names[hf_name]))
        if got != tuple(shape):
            raise ValueError(f"tensor {names[hf_name]!r} in {ckpt.file_of(names[hf_name])} has shape {got}, "
                             f"expected {tuple(shape)} from config.json")
    for hf_name, want in integer.items():  # quantized weights: a float tensor would be silently cast
        got = ckpt.dtype(names[hf_name])
        if got != want:
            raise ValueError(f"tensor {names[hf_name]!r} in {ckpt.file_of(names[hf_name])} has dtype {got}, expected "
                             f"{want} for the quantization_config in config.json")


def _few(names, n=5):
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def hf_state_dict(model):
    """The model's weights under HF names and layouts (each tensor its own contiguous CPU copy)."""
    ours = dict(model.named_parameters(remove_duplicate=False), **dict(model.named_buffers()))
    out = {}
    for entry in model_weight_map(model):
        tensor = ours[entry.ours].detach()
        for hf_name, part in zip(entry.hf, tensor.split(list(entry.sizes), dim=0)):
            part = part.t() if entry.transpose else part
            out[hf_name] = part.to("cpu", copy=True).contiguous()
    return out


def save_pretrained(model, out_dir):
    """config.json + model.safetensors that transformers' from_pretrained loads for the model's family."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    hf_config = model.config.to_hf()
    dtype_name = str(model.dtype).replace("torch.", "")
    hf_config.update(dtype=dtype_name, torch_dtype=dtype_name)
    if getattr(model, "quant_config", None) is not None:
        hf_config["quantization_config"] = model.quant_config.to_json()
    weights = out / "model.safetensors"
    save_file(hf_state_dict(model), str(weights), metadata={"format": "pt"})
    os.chmod(weights, 0o666 & ~_umask())  # safetensors creates it 0600; give it the mode of the other files
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _umask() -> int:
    """The process umask (read without changing it where /proc allows; os.umask sets it back at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
