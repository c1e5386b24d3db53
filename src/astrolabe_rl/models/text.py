"""Text conditioning: the encoder protocol, the umT5-XXL encoder, a deterministic hashing encoder, a prompt cache.

Real models use umT5-XXL through transformers' ``UMT5EncoderModel`` (`reference/ar_models.md` §1.4): prompts are
cleaned as Wan's tokenizer does (`clean_prompt`: ``ftfy.fix_text``, HTML unescape, whitespace), tokenised to exactly
``text_len`` = 512 tokens (``</s>`` appended, padded, truncated), encoded with the attention mask, and every row
after the prompt's last token is set to zero, as the official encoder does.
Weights come from a Wan2.1 folder, in either layout:

* original: ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's own T5 naming, converted on load by `wan_t5_to_hf`) and the
  tokenizer folder ``google/umt5-xxl/``;
* diffusers: ``text_encoder/`` (a ``UMT5EncoderModel`` folder) and ``tokenizer/``.

A tiny model needs no language model: `HashTextEncoder` maps each word to a fixed random vector, and
`tiny_umt5_encoder` builds a random 2-layer ``UMT5EncoderModel`` with an offline word-level tokenizer for tests.

`PromptCache` stores each prompt's embedding on disk keyed by (encoder, prompt, cleaned prompt), so training never
encodes a prompt twice (and the 11 GB encoder need not be loaded at all once every prompt is cached).

transformers and ftfy are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

ORIGINAL_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_TOKENIZER_DIR = "google/umt5-xxl"


def read_prompt_file(path: str | Path, what: str = "prompt file") -> list[str]:
    """One prompt per non-empty line (stripped); errors name the file and say what is wrong."""
    from astrolabe_rl.errors import path_problem

    p = Path(path)
    problem = path_problem(p, what)
    if problem:
        raise ValueError(problem)
    data = p.read_bytes()
    if b"\0" in data:  # no prompt holds a NUL byte: an image, a video, an archive (or UTF-16 text)
        raise ValueError(f"{what} {p} is a binary file (it holds NUL bytes), not UTF-8 text with one prompt a line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {p} is not UTF-8 text (undecodable byte at offset {e.start}); "
                         "save it as UTF-8, one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{what} {p} has no prompts (one per line)")
    return prompts


class TextEncoder(Protocol):
    """Turns prompts into the DiT's text embeddings ``[B, text_len, text_dim]`` (zero rows after the prompt)."""

    def __call__(self, prompts: list[str]) -> Tensor: ...


class HashTextEncoder:
    """Word-level embeddings from a seeded random table indexed by a stable hash (crc32) of each word.

    Args:
        text_dim: embedding width (the DiT's ``text_dim``).
        text_len: tokens per prompt; longer prompts are truncated, shorter ones zero-padded.
        vocab: hash buckets.
        seed: seed of the table.
    """

    def __init__(self, text_dim: int, text_len: int, vocab: int = 4096, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, text_dim, generator=g)
        self.text_len = text_len
        self.cache_id = f"hash-{text_dim}x{text_len}-v{vocab}-s{seed}"

    def token_ids(self, prompt: str) -> list[int]:
        words = prompt.lower().split()[: self.text_len]
        return [zlib.crc32(w.encode()) % self.table.shape[0] for w in words]

    def __call__(self, prompts: list[str]) -> Tensor:
        out = torch.zeros(len(prompts), self.text_len, self.table.shape[1])
        for i, p in enumerate(prompts):
            ids = self.token_ids(p)
            if not ids:
                raise ValueError(f"prompt {i} is empty; give at least one word")
            out[i, : len(ids)] = self.table[ids]
        return out


# ------------------------------------------------------------------------------------------------- umT5


def clean_prompt(text: str) -> str:
    """Wan's ``clean='whitespace'`` prompt preprocessing: ``ftfy.fix_text`` (mojibake, curly quotes, ligatures,
    full-width characters, control characters, NFC composition), then HTML escapes undone twice, then runs of
    whitespace collapsed to one space and the ends stripped. Each step changes token ids, so all three must match
    the tokenizer the model was trained with."""
    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


class UMT5TextEncoder:
    """umT5 encoder + tokenizer -> ``[B, text_len, d_model]`` embeddings with zeroed padding rows.

    Args:
        model: a transformers ``UMT5EncoderModel`` (device and dtype are taken from it).
        tokenizer: its tokenizer (``</s>``-appending, with a pad token).
        text_len: tokens per prompt (512 for Wan).
        name: identifies the weights in `cache_id` (e.g. the checkpoint path).
    """

    def __init__(
        self, model: "UMT5EncoderModel", tokenizer: "PreTrainedTokenizerBase", text_len: int = 512, name: str = "umt5"
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; umT5 pads with <pad> (id 0)")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.cache_id = umt5_id(name, text_len, model.dtype)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Tensor:
        """``prompts`` (P strings) -> ``[P, text_len, d_model]`` in the model dtype, rows after each prompt zero."""
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts], padding="max_length", max_length=self.text_len, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        device = self.model.device
        mask = tokens["attention_mask"].to(device)
        hidden = self.model(input_ids=tokens["input_ids"].to(device), attention_mask=mask).last_hidden_state
        # Padding rows are not zero at the encoder's output; the DiT attends to every row, so zero them as Wan does.
        # Assigned, not multiplied by the mask: 0 · inf or 0 · nan in a padding row would stay non-finite.
        return hidden.masked_fill(~mask.bool()[..., None], 0.0)


def umt5_id(name: str, text_len: int, dtype: torch.dtype) -> str:
    """The `PromptCache` namespace of an umT5 encoder: its weights, token count and dtype all change embeddings."""
    return f"umt5-{name}-{text_len}-{str(dtype).removeprefix('torch.')}"


def umt5_cache_id(wan_dir: str | Path, dtype: torch.dtype, text_len: int = 512) -> str:
    """`umt5_id` of the encoder `load_umt5` would build, computed without loading it."""
    weights, _ = find_text_encoder_files(wan_dir)
    return umt5_id(_fingerprint(weights), text_len, dtype)


# Wan's own T5 module names -> transformers' UMT5 names, per block ("{i}" = block index).
_T5_BLOCK_RULES = (
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),  # the GELU-gated branch
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
)
_T5_TOP_RULES = (("token_embedding.weight", "shared.weight"), ("norm.weight", "encoder.final_layer_norm.weight"))


def wan_t5_to_hf(sd: dict[str, Tensor], source: str = "umT5 checkpoint") -> dict[str, Tensor]:
    """Wan's ``umt5_xxl(encoder_only=True)`` state dict -> ``UMT5EncoderModel`` names (the embedding is also
    written to the tied ``encoder.embed_tokens.weight``). Unknown keys raise a `CheckpointError`."""
    from astrolabe_rl.models.loading import CheckpointError

    top = dict(_T5_TOP_RULES)
    block = dict(_T5_BLOCK_RULES)
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if key in top:
            out[top[key]] = value
        elif m and m.group(2) in block:
            out[f"encoder.block.{m.group(1)}.{block[m.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} keys are not Wan umT5-encoder names: {', '.join(sorted(unknown)[:5])}; "
            f"expected `{ORIGINAL_T5_FILE}` (token_embedding, blocks.N.attn.q, blocks.N.ffn.gate.0, ...)"
        )
    if "shared.weight" in out:
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def hf_to_wan_t5(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `wan_t5_to_hf` (drops the tied ``encoder.embed_tokens.weight``)."""
    top = {hf: wan for wan, hf in _T5_TOP_RULES}
    block = {hf: wan for wan, hf in _T5_BLOCK_RULES}
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)
        if key in top:
            out[top[key]] = value
        elif m and m.group(2) in block:
            out[f"blocks.{m.group(1)}.{block[m.group(2)]}"] = value
    return out


def umt5_config_from_state_dict(sd: dict[str, Tensor]) -> Any:
    """A ``UMT5Config`` whose sizes are read off an HF-named encoder state dict (umT5-XXL: 24 layers, d_model 4096,
    64 heads × 64, d_ff 10240, 32 relative buckets; the max distance 128 is umT5's fixed value)."""
    from transformers import UMT5Config

    emb = sd["shared.weight"]
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
    buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    return UMT5Config(
        vocab_size=emb.shape[0], d_model=emb.shape[1], num_layers=layers, num_heads=heads,
        d_kv=sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        d_ff=sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1,
    )


def umt5_from_wan_state_dict(sd: dict[str, Tensor], source: str = "umT5 checkpoint") -> "UMT5EncoderModel":
    """A ``UMT5EncoderModel`` holding exactly the weights of a Wan-named encoder state dict (strict, no random init)."""
    from transformers import UMT5EncoderModel

    from astrolabe_rl.models.loading import check_state_dict

    hf = wan_t5_to_hf(sd, source)
    config = umt5_config_from_state_dict(hf)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(hf, expected, what=f"umT5 encoder ({config.num_layers} layers, d_model {config.d_model})",
                     source=source)
    model.load_state_dict(hf, strict=True, assign=True)
    model.tie_weights()
    return model


def find_text_encoder_files(wan_dir: str | Path) -> tuple[Path, Path]:
    """(weights, tokenizer folder) of a Wan2.1 folder in original or diffusers layout, or FileNotFoundError saying
    what is missing and where it looked."""
    wan_dir = Path(wan_dir)
    layouts = [
        (wan_dir / ORIGINAL_T5_FILE, wan_dir / ORIGINAL_TOKENIZER_DIR),
        (wan_dir / "text_encoder", wan_dir / "tokenizer"),
    ]
    for weights, tokenizer in layouts:
        if weights.exists() and tokenizer.is_dir():
            return weights, tokenizer
    looked = "; ".join(f"{w} + {t}/" for w, t in layouts)
    raise FileNotFoundError(
        f"no umT5 text encoder in {wan_dir}: looked for {looked}. Point --wan-dir at the Wan2.1-T2V folder "
        "(huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B --local-dir wan_models/Wan2.1-T2V-1.3B)"
    )


def load_umt5(
    wan_dir: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    text_len: int = 512, trust_pickle: bool = False,
) -> UMT5TextEncoder:
    """The umT5-XXL encoder of a Wan2.1 folder (original ``.pth`` converted on load, or the diffusers layout)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    from astrolabe_rl.models.loading import read_checkpoint, strip_prefixes

    weights, tokenizer_dir = find_text_encoder_files(wan_dir)
    if weights.is_dir():
        model = UMT5EncoderModel.from_pretrained(weights, torch_dtype=dtype, local_files_only=True)
    else:
        sd = strip_prefixes(read_checkpoint(weights, trust_pickle=trust_pickle), str(weights))
        model = umt5_from_wan_state_dict(sd, str(weights))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return UMT5TextEncoder(model.to(device, dtype), tokenizer, text_len, name=_fingerprint(weights))


def _fingerprint(path: Path) -> str:
    """Path, size and mtime of the weights: a changed file gets a new prompt-cache namespace."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    blob = "|".join(f"{f.resolve()}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files if f.is_file())
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def word_tokenizer(words: list[str]) -> "PreTrainedTokenizerBase":
    """An offline T5-style word-level tokenizer: ids 0 = <pad>, 1 = </s> (appended), 2 = <unk>, then ``words``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_umt5_encoder(
    words: list[str], *, d_model: int = 16, text_len: int = 8, num_layers: int = 2, seed: int = 0
) -> UMT5TextEncoder:
    """A random 2-layer ``UMT5EncoderModel`` (4 heads) with a `word_tokenizer` over ``words``: no files, no network."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = word_tokenizer(words)
    config = UMT5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=num_layers,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = UMT5EncoderModel(config)
    finally:
        torch.random.set_rng_state(state)
    return UMT5TextEncoder(model, tokenizer, text_len, name=f"tiny-s{seed}")


# ------------------------------------------------------------------------------------------ prompt cache


class PromptCache:
    """Prompt embeddings on disk, one small safetensors file per (encoder, prompt).

    Files hold only the prompt's rows (the zero padding is rebuilt on read) in the encoder's dtype; writes are
    atomic, so several ranks may fill the same directory. The key also covers the prompt as `clean_prompt` turns it
    into tokenizer input: an entry written under another cleaning rule (e.g. before ``ftfy.fix_text`` was part of
    it, or by another ftfy release that fixes this prompt differently) is never reused, it is re-encoded.

    Args:
        directory: where the files live (created).
        encoder_id: names the encoder and its weights (an encoder's ``cache_id``); part of every key, so two
            encoders never share entries.
    """

    def __init__(self, directory: str | Path, encoder_id: str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.encoder_id = encoder_id
        self._memory: dict[str, Tensor] = {}

    def _key(self, prompt: str) -> str:
        """What an entry must match: the encoder, the prompt and its cleaned text."""
        return f"{self.encoder_id}\x00{prompt}\x00{clean_prompt(prompt)}"

    def path(self, prompt: str) -> Path:
        digest = hashlib.sha256(self._key(prompt).encode()).hexdigest()
        return self.directory / f"{digest[:40]}.safetensors"

    def get(self, prompt: str) -> Tensor | None:
        """``[text_len, dim]`` or None if not cached."""
        if prompt not in self._memory:
            path = self.path(prompt)
            if not path.is_file():
                return None
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
                if (meta.get("prompt"), meta.get("encoder"), meta.get("cleaned")) != (
                        prompt, self.encoder_id, clean_prompt(prompt)):
                    return None  # a hash collision or a foreign file: re-encode rather than trust it
                rows = f.get_tensor("rows")
            emb = rows.new_zeros(int(meta["text_len"]), rows.shape[1])
            emb[: rows.shape[0]] = rows
            self._memory[prompt] = emb
        return self._memory[prompt]

    def put(self, prompt: str, embedding: Tensor) -> None:
        """Store ``embedding`` ``[text_len, dim]`` (rows after the last non-zero row are padding)."""
        from safetensors.torch import save_file

        nonzero = embedding.detach().abs().amax(dim=-1).nonzero()
        length = int(nonzero[-1]) + 1 if len(nonzero) else 0
        meta = {"prompt": prompt, "encoder": self.encoder_id, "cleaned": clean_prompt(prompt),
                "text_len": str(embedding.shape[0])}
        path = self.path(prompt)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"rows": embedding[:length].detach().cpu().contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
        self._memory[prompt] = embedding.detach().cpu()

    def missing(self, prompts: list[str]) -> list[str]:
        """The distinct prompts not cached yet, in order."""
        return [p for p in dict.fromkeys(prompts) if self.get(p) is None]

    def fill(self, prompts: list[str], encoder: TextEncoder, batch_size: int = 16) -> None:
        """Encode and store every prompt not cached yet, ``batch_size`` at a time."""
        todo = self.missing(prompts)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            for prompt, emb in zip(chunk, encoder(chunk)):
                self.put(prompt, emb)

    def __call__(self, prompts: list[str]) -> Tensor:
        """``[P, text_len, dim]`` for prompts that are all cached (KeyError naming the first missing ones)."""
        missing = self.missing(prompts)
        if missing:
            raise KeyError(f"{len(missing)} prompts are not cached yet (call fill first): {missing[:3]}")
        return torch.stack([self.get(p) for p in prompts])
