"""Tokenizer loading from a HF checkpoint folder, on the `tokenizers` library alone (no transformers).

Sources: tokenizer.json, or GPT-2's vocab.json + merges.txt (byte-level BPE). Special tokens from
tokenizer_config.json, then special_tokens_map.json, then generation_config.json (whose eos_token_id
may be a list: Llama 3 stops on several tokens). Whether a bos token is prepended follows
tokenizer_config's add_bos_token when present, else what tokenizer.json's post-processor does."""
import json
from pathlib import Path

from fastlm.model.json_files import eos_id_list, read_json_object

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class Tokenizer:
    """encode/decode text <-> token ids, with the checkpoint's bos/eos/pad conventions."""

    def __init__(self, backend: HFTokenizer, bos_token_id=None, eos_token_ids=(), pad_token_id=None, add_bos=False):
        if add_bos and bos_token_id is None:
            raise ValueError("add_bos needs a bos_token_id")
        self.backend, self.bos_token_id, self.pad_token_id = backend, bos_token_id, pad_token_id
        self.eos_token_ids, self.add_bos = list(eos_token_ids), bool(add_bos)

    @property
    def eos_token_id(self):
        """The first eos id (the one written as `eos_token`), or None."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        """Token ids of text; prepends bos when the checkpoint's tokenizer does and add_special_tokens."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id] + ids if add_special_tokens and self.add_bos else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError("ids must be a list of ints or a 1-D integer tensor")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids contains {bad[0]}, outside the vocabulary [0, {self.vocab_size})")
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token(self, token_id):
        """The token string of an id; None for None or an id the tokenizer does not have."""
        return None if token_id is None else self.backend.id_to_token(token_id)

    def save(self, out_dir) -> None:
        """tokenizer.json + tokenizer_config.json + special_tokens_map.json (+ generation_config.json's
        token ids), readable by load_tokenizer and by transformers' AutoTokenizer."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._backend_for_hf().save(str(out / "tokenizer.json"))
        special = {f"{k}_token": self.token(i) for k, i in
                   (("bos", self.bos_token_id), ("eos", self.eos_token_id), ("pad", self.pad_token_id))
                   if self.token(i) is not None}  # an id beyond the tokenizer's tokens: generation_config only
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos, **special}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
        if len(self.eos_token_ids) > 1 or "eos_token" not in special and self.eos_token_ids:
            # only generation_config.json can hold several eos ids, or one the tokenizer lacks
            gen_path = out / "generation_config.json"
            gen = {**read_json_object(gen_path), "eos_token_id": self.eos_token_ids}
            gen_path.write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")

    def _backend_for_hf(self) -> HFTokenizer:
        """A copy whose post-processor prepends bos when we do (AutoTokenizer reads only tokenizer.json)."""
        backend = HFTokenizer.from_str(self.backend.to_str())
        probe = backend.encode("a", add_special_tokens=True).ids
        adds_bos = bool(probe) and probe[0] == self.bos_token_id and len(probe) > len(backend.encode("a", add_special_tokens=False).ids)
        if self.add_bos and not adds_bos:
            bos = self.token(self.bos_token_id)
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_token_id)])
        elif not self.add_bos and adds_bos:
            backend.post_processor = None
        return backend


def load_tokenizer(path, model_vocab_size=None) -> Tokenizer:
    """The tokenizer of a checkpoint folder; see the module docstring for the files read.

    With model_vocab_size (the model's embedding rows): a tokenizer with more tokens than the model is
    an error, and special ids from generation_config.json are checked against the model's vocabulary
    (transformers accepts an eos id the model has but the tokenizer file lacks; so do we)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    backend = _load_backend(folder)
    size = backend.get_vocab_size(with_added_tokens=True)
    if model_vocab_size is not None and size > model_vocab_size:
        raise ValueError(f"the tokenizer in {folder} has {size} tokens but the model's vocabulary has only "
                         f"{model_vocab_size}: they do not belong together")
    limit = size if model_vocab_size is None else model_vocab_size
    settings = _read_special_settings(folder)
    to_id = lambda token, source: _token_id(backend, token, source)  # noqa: E731
    bos = to_id(*settings["bos"]) if settings["bos"][0] is not None else settings["gen"].get("bos_token_id")
    pad = to_id(*settings["pad"]) if settings["pad"][0] is not None else settings["gen"].get("pad_token_id")
    eos = [to_id(*settings["eos"])] if settings["eos"][0] is not None else []
    for i in eos_id_list(settings["gen"].get("eos_token_id")):
        if i not in eos:
            eos.append(i)
    for name, i in [("bos_token_id", bos), ("pad_token_id", pad)] + [("eos_token_id", i) for i in eos]:
        if i is not None and not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < limit):
            raise ValueError(f"{name} {i!r} (from {folder / 'generation_config.json'}) is not a token id of "
                             f"the vocabulary [0, {limit})")
    if bos is None and not eos and backend.token_to_id("<|endoftext|>") is not None:
        bos = eos_id = backend.token_to_id("<|endoftext|>")  # GPT-2's defaults when no file names them
        eos = [eos_id]
    add_bos = settings["add_bos"]
    if add_bos is None:  # follow tokenizer.json's post-processor
        with_special = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and len(with_special) > len(backend.encode("a", add_special_tokens=False).ids) \
            and with_special[0] == bos
    _register_special(backend, [bos, pad] + eos)
    return Tokenizer(backend, bos, eos, pad, add_bos=bool(add_bos) and bos is not None)


def _load_backend(folder: Path) -> HFTokenizer:
    tokenizer_json, vocab, merges = folder / "tokenizer.json", folder / "vocab.json", folder / "merges.txt"
    if tokenizer_json.is_file():
        try:
            return HFTokenizer.from_file(str(tokenizer_json))
        except Exception as e:
            raise ValueError(f"{tokenizer_json} is not a valid tokenizers file: {e}") from None
    if vocab.is_file() and merges.is_file():
        try:
            backend = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as e:
            raise ValueError(f"cannot read the BPE vocabulary {vocab} / {merges}: {e}") from None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # as GPT2TokenizerFast
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        return backend
    raise FileNotFoundError(f"no tokenizer in {folder}: expected tokenizer.json, or vocab.json + merges.txt")


def _read_special_settings(folder: Path) -> dict:
    """bos/eos/pad as (token string, source file), add_bos (bool or None), generation_config dict."""
    files = [(name, read_json_object(folder / name)) for name in SPECIAL_FILES]
    out = {}
    for key in ("bos", "eos", "pad"):
        out[key] = (None, None)
        for name, data in files:
            token = data.get(f"{key}_token")
            token = token.get("content") if isinstance(token, dict) else token
            if token is not None:
                out[key] = (token, folder / name)
                break
    add_bos = files[0][1].get("add_bos_token")
    out["add_bos"] = add_bos if isinstance(add_bos, bool) else None
    out["gen"] = read_json_object(folder / "generation_config.json")
    return out


def _token_id(backend, token, source):
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise ValueError(f"special token {token!r} named in {source} is not in the vocabulary")
    return token_id


def _register_special(backend, ids):
    """Mark bos/eos/pad as special so decode(skip_special_tokens=True) drops them (vocab.json fallback)."""
    from tokenizers import AddedToken

    tokens = [backend.id_to_token(i) for i in dict.fromkeys(i for i in ids if i is not None)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens if t is not None])
