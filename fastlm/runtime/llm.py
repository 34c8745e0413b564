"""fastlm.LLM: the Python API.

    llm = fastlm.LLM("path/to/checkpoint", dtype="bfloat16")
    llm.generate("Once upon a time", max_new_tokens=50, temperature=0.8, top_p=0.95, seed=0)  # -> str
    llm.generate(["first prompt", "second"], max_new_tokens=50)                              # -> list[str]
    for piece in llm.stream("Once upon a time", max_new_tokens=50): print(piece, end="")
    llm.generate_tokens([[464, 2068], [818]], max_new_tokens=20, temperature=0)            # -> list[list[int]]

Context rule: a prompt must leave room to generate (prompt tokens < the model's context, else
ValueError); max_new_tokens is clipped so that the longest prompt of the call plus its new tokens fit
the context (generation then ends early, as at max_new_tokens).
"""
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import torch

from fastlm.model.devices import resolve_device
from fastlm.model.json_files import eos_id_list, read_json_object
from fastlm.model.model_path import resolve_model_path
from fastlm.runtime.cpu_linear import pack_linears, packing_available
from fastlm.runtime.generate import TokenLoop, check_prompt_ids, default_sync_every, new_token_budget
from fastlm.runtime.sampling import SamplingParams
from fastlm.runtime.text import SequenceText
from fastlm.runtime.workspaces import WorkspacePool


def check_text_prompts(prompt) -> List[str]:
    """A str or a non-empty list of str, none empty; ValueError naming the argument otherwise."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise ValueError(f"prompt must be a string or a list of strings, got {type(text).__name__} at {i}")
        if not text:
            raise ValueError("prompt must not be empty (empty prompt)")
    return list(prompts)


class LLM:
    """A checkpoint loaded for generation: `model` (fastlm.model.Transformer) and `tokenizer`."""

    def __init__(self, model: Optional[Union[str, Path]] = None, dtype=None, device=None, quantize=None):
        """quantize: None, "int8" or "int4" (also "int4-g32" / "-g64" / "-g128"): weight-only quantized linear
        layers (fastlm.model.quantize). A checkpoint written by `fastlm quantize` loads quantized as it is."""
        from fastlm.model import Transformer, load_tokenizer

        path = resolve_model_path(model)
        self.path = path
        self.model = Transformer.from_pretrained(path, dtype=dtype, device=resolve_device(device), quantize=quantize)
        if packing_available(self.model.dtype, self.model.device):
            pack_linears(self.model)  # CPU: weights prepacked for oneDNN (see cpu_linear.py)
        vocab = self.model.config.vocab_size
        self.tokenizer = load_tokenizer(path, model_vocab_size=vocab) if _has_tokenizer(path) else None
        self.eos_token_ids = tuple(self.tokenizer.eos_token_ids or ()) if self.tokenizer else _config_eos_ids(path)
        self._workspaces = WorkspacePool(self.model)  # one KV cache per live call (threads, interleaved streams)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generate(self, prompt: Union[str, Sequence[str]], max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 stop: Union[str, Sequence[str], None] = None, seed: Optional[int] = None):
        """New text for one prompt (-> str) or a batch (-> list[str]); the prompt is not repeated.
        temperature 0 is greedy; top_k 0 / top_p 1 / min_p 0 / repetition_penalty 1 switch those off.
        Ends at eos, at a stop string (it and what follows are dropped), or after max_new_tokens
        (clipped to the context, see the module docstring)."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, stop, seed)
        texts = check_text_prompts(prompt)
        outputs = [[] for _ in texts]
        with closing(self._run(self._encode(texts), params, streaming=False, want_text=True)) as run:
            for _, pieces in run:
                for row, piece in enumerate(pieces):
                    outputs[row].append(piece)
        results = ["".join(parts) for parts in outputs]
        return results[0] if isinstance(prompt, str) else results

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
               stop: Union[str, Sequence[str], None] = None, seed: Optional[int] = None) -> Iterator[str]:
        """Like generate for one prompt, yielding the text as it is produced (pieces join to generate's)."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, stop, seed)
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string for stream(), got {type(prompt).__name__}")
        prompt_ids = self._encode(check_text_prompts(prompt))
        with closing(self._run(prompt_ids, params, streaming=True, want_text=True)) as run:
            for _, pieces in run:  # closing: an abandoned stream gives its workspace back at once
                if pieces[0]:
                    yield pieces[0]

    def generate_tokens(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                        repetition_penalty: float = 1.0, stop: Union[str, Sequence[str], None] = None,
                        seed: Optional[int] = None) -> List[List[int]]:
        """New token ids per prompt (eos excluded). With stop strings, a row's ids end with the token
        that completed the stop string (text cannot be cut inside a token)."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, stop, seed)
        prompts = check_prompt_ids(prompts, self.model.config.vocab_size)
        if params.stop:
            self._need_tokenizer()
        outputs = [[] for _ in prompts]
        with closing(self._run(prompts, params, streaming=False, want_text=bool(params.stop))) as run:
            for ids, _ in run:
                for row, new in enumerate(ids):
                    outputs[row].extend(new)
        return outputs

    def _encode(self, texts: List[str]) -> List[List[int]]:
        self._need_tokenizer()
        encoded = [list(self.tokenizer.encode(t)) for t in texts]
        for ids in encoded:
            if not ids:
                raise ValueError("prompt must not be empty (empty prompt)")
        return encoded

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"checkpoint {self.path} has no tokenizer (tokenizer.json or vocab.json + merges.txt); "
                             "text and stop strings need one, generate_tokens() works without")

    def _run(self, prompts, params: SamplingParams, streaming: bool, want_text: bool):
        """Yields (new ids per row, new text per row) as generation proceeds; the text lists are
        empty strings when want_text is False. Holds its own workspace until it ends or is closed."""
        budget = new_token_budget([len(p) for p in prompts], params.max_new_tokens, self.model.config.max_seq_len)
        params = replace(params, max_new_tokens=budget)
        with self._workspaces.checkout(len(prompts), max(len(p) for p in prompts) + budget) as (cache, step):
            loop = TokenLoop(self.model, cache, step, prompts, params, self.eos_token_ids,
                             sync_every=default_sync_every(cache.device, streaming),
                             vocab_size=self.tokenizer.vocab_size if self.tokenizer else None)
            texts = [SequenceText(self.tokenizer, p, params.stop) for p in prompts] if want_text else None
            for chunk in loop:
                yield (chunk, [""] * len(chunk)) if texts is None else _add_text(loop, texts, chunk)
        if texts is not None:
            yield [[] for _ in prompts], [t.finish() for t in texts]


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())


def _config_eos_ids(path: Path) -> tuple:
    """eos ids from generation_config.json / config.json when there is no tokenizer."""
    for name in ("generation_config.json", "config.json"):
        eos = eos_id_list(read_json_object(path / name).get("eos_token_id"))
        if eos:
            return tuple(eos)
    return ()


def _add_text(loop: TokenLoop, texts: List[SequenceText], chunk: List[List[int]]):
    """Feed each row's new ids to its text; a completed stop string ends the row (loop.finish) and
    cuts its ids after the completing token."""
    ids_out, pieces = [], []
    for row, ids in enumerate(chunk):
        kept, parts = [], []
        for token in ids:
            kept.append(token)
            piece, stopped = texts[row].add(token)
            parts.append(piece)
            if stopped:
                loop.finish(row)
                break
        ids_out.append(kept)
        pieces.append("".join(parts))
    return ids_out, pieces
