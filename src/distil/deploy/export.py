"""Turn a trained student (a Hugging Face folder) into deployable artifacts.

Formats:
  hf    a plain Hugging Face folder (safetensors), LoRA adapters merged if the folder holds any;
  gguf  one .gguf file for llama.cpp (f16 or q8_0), written with the `gguf` package under
        llama.cpp's tensor names (Llama-architecture models with a byte-level BPE tokenizer);
  onnx  model.onnx with KV-cache inputs and outputs (`past_key_values.{i}.key/value` in,
        `present.{i}.key/value` out), plus config and tokenizer, for onnxruntime;
  int8  torch dynamic int8 quantization of every Linear layer for CPU, stored as plain tensors
        in safetensors (int8 weights, per-channel scales and zero points) and rebuilt by
        `load_int8`: nothing is unpickled.

Each export writes `distil_export.json` (format, quantization, source) beside or into its
artifact so the evaluator knows how to load it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distil.errors import DistilError, require
from distil.files import write_atomic
from distil.models.sources import size_on_disk

FORMATS = ("hf", "gguf", "onnx", "int8")
GGUF_QUANTS = ("f16", "q8_0")
MARKER = "distil_export.json"


@dataclass
class Exported:
    """One artifact on disk."""
    format: str
    path: Path  # the folder (hf, onnx, int8) or the .gguf file
    quant: str | None
    size_bytes: int

    @property
    def label(self) -> str:
        return f"{self.format}-{self.quant}" if self.quant else self.format


def load_source(model_dir: Path | str):
    """The fp32 model and tokenizer of a HF folder; a folder of LoRA adapters is merged first."""
    from transformers import AutoModelForCausalLM

    from distil.models.sources import load_tokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DistilError("model folder not found", file=str(model_dir), field="model")
    if (model_dir / "adapter_config.json").exists():
        from distil.models.lora import load_merged

        model = load_merged(model_dir)
    elif (model_dir / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        raise DistilError("not a Hugging Face model folder (no config.json or adapter_config.json)",
                          file=str(model_dir), field="model")
    return model.eval(), load_tokenizer(model_dir)


def export_model(model_dir: Path | str, fmt: str, out: Path | str, quant: str | None = None) -> Exported:
    """Export the model in `model_dir` as `fmt` to `out` (a folder, or a .gguf file for gguf).

    Args:
        model_dir: a Hugging Face folder (e.g. `<run>/student`).
        fmt: one of FORMATS.
        out: where to write; replaced if it exists.
        quant: gguf only: "f16" (default) or "q8_0".

    Example:
        >>> export_model("runs/quickstart/student", "gguf", "student-q8_0.gguf", quant="q8_0")
    """
    if fmt not in FORMATS:
        raise DistilError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}", field="format")
    if quant is not None and fmt != "gguf":
        raise DistilError(f"--quant applies to gguf only (int8 is its own format), not {fmt}", field="quant")
    quant = (quant or "f16") if fmt == "gguf" else None
    if quant is not None and quant not in GGUF_QUANTS:
        raise DistilError(f"unknown GGUF quantization '{quant}'; choose one of {', '.join(GGUF_QUANTS)}", field="quant")
    model, tokenizer = load_source(model_dir)
    out = Path(out)

    def write(tmp: Path) -> None:
        if fmt == "hf":
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        elif fmt == "gguf":
            write_gguf(model, tokenizer, tmp, quant)
        elif fmt == "onnx":
            write_onnx(model, tokenizer, tmp)
        else:
            write_int8(model, tokenizer, tmp)
        if tmp.is_dir():
            (tmp / MARKER).write_text(json.dumps({"format": fmt, "quant": quant, "source": str(model_dir)}, indent=2))

    if out.is_file():  # a folder export replacing an earlier single-file one
        out.unlink()
    write_atomic(out, write)
    return Exported(fmt, out, quant, size_on_disk(out))


# --- GGUF -----------------------------------------------------------------------------------



def _llama_check(config) -> None:
    problems = []
    if config.model_type != "llama":
        problems.append(f"architecture '{config.model_type}' (GGUF export supports llama)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("bias terms in attention or MLP")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type '{rope.get('rope_type')}'")
    if problems:
        raise DistilError("cannot write GGUF for this model: " + "; ".join(problems), field="format")


def _permute_for_ggml(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k projection rows from HF's rotate-half RoPE layout to GGML's interleaved one.

    transformers' GGUF loader applies the inverse, so a round trip is exact.
    """
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, read from its structure.

    Only structures whose llama.cpp counterpart splits text identically are accepted.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    raise DistilError(f"cannot write GGUF: unsupported pre-tokenizer {kinds} (supported: GPT-2 byte-level, "
                      "SmolLM's digits + byte-level)", field="tokenizer")


def _add_tokenizer(writer, tokenizer, folder: Path, n_vocab: int) -> None:
    import gguf

    tokenizer.save_pretrained(folder)
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")) if (folder / "tokenizer.json").exists() else {}
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise DistilError(f"cannot write GGUF: tokenizer model '{model.get('type')}' is not a byte-level BPE "
                          "(GPT-2 style, as SmolLM2 and Llama 3 use)", field="tokenizer")
    pre = _bpe_pre_tokenizer(tj)
    vocab = gguf.vocab.BpeVocab(folder)
    special = {t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
    user = {t["id"] for t in tj.get("added_tokens", []) if not t.get("special")}
    tokens, types = [], []
    for i, (text, _score, _kind) in enumerate(vocab.all_tokens()):
        tokens.append(text)
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.USER_DEFINED if i in user else gguf.TokenType.NORMAL)
    for i in range(len(tokens), n_vocab):  # the embedding may be padded past the tokenizer's size
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens[:n_vocab])
    writer.add_token_types(types[:n_vocab])
    special_vocab = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    special_vocab.add_to_gguf(writer, quiet=True)
    if tokenizer.pad_token_id is not None and "pad" not in special_vocab.special_token_ids:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if "bos" not in special_vocab.add_special_token:  # say what the HF tokenizer does, not llama.cpp's default
        bos = tokenizer.bos_token_id
        writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])


def write_gguf(model, tokenizer, path: Path, quant: str = "f16") -> None:
    """Write a Llama-architecture model and its tokenizer as one GGUF file (f16 or q8_0).

    Tensors are named by gguf's own HF -> llama.cpp map; 1-D tensors (norms) stay float32, as
    llama.cpp's converter keeps them; a q8_0 file falls back to f16 for rows not divisible by 32.
    """
    import tempfile

    import gguf

    config = model.config
    _llama_check(config)
    n_layers, n_head, n_kv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or {}
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "distil-student")).name or "distil-student")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with tempfile.TemporaryDirectory() as tok_dir:
        _add_tokenizer(writer, tokenizer, Path(tok_dir), config.vocab_size)

    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        if name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise DistilError(f"cannot write GGUF: no llama.cpp name for tensor '{name}'", field="format")
        data = tensor.detach().float()
        if name.endswith("self_attn.q_proj.weight"):
            data = _permute_for_ggml(data, n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            data = _permute_for_ggml(data, n_kv)
        array = data.numpy()
        if array.ndim == 1:
            writer.add_tensor(gguf_name, array.astype(np.float32))
        elif quant == "q8_0" and array.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_gguf_as_transformers(path: Path):
    """A GGUF file dequantized into a float32 transformers model (the loader distil uses for teachers)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(Path(path).parent, gguf_file=Path(path).name, dtype=torch.float32).eval()


# --- ONNX -----------------------------------------------------------------------------------

class _WithFlatCache(torch.nn.Module):
    """A causal LM whose KV cache goes in and out as flat tensors, as ONNX graphs need."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past: tuple[torch.Tensor, ...]):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def onnx_io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids"] + past, ["logits"] + present


def kv_shape(config) -> tuple[int, int]:
    """(key/value heads, head dim) of one layer's cache."""
    return config.num_key_value_heads, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_onnx(model, tokenizer, folder: Path) -> None:
    """Export with the torch.export-based ONNX exporter; batch, sequence and past length are dynamic.

    The first step feeds a past of length 0; every later step feeds the previous step's
    `present.*` back as `past_key_values.*`. `attention_mask` covers past + new tokens.
    """
    import warnings

    require("onnxscript", "onnx")
    config = model.config
    n_layers = config.num_hidden_layers
    heads, head_dim = kv_shape(config)
    batch, seq, past_len, total = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    b, s, p = 2, 3, 4
    example = (torch.randint(0, config.vocab_size, (b, s)), torch.ones(b, p + s, dtype=torch.long),
               torch.arange(p, p + s)[None].repeat(b, 1),
               tuple(torch.zeros(b, heads, p, head_dim) for _ in range(2 * n_layers)))
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
               tuple({0: batch, 2: past_len} for _ in range(2 * n_layers)))
    inputs, outputs = onnx_io_names(n_layers)
    folder.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_WithFlatCache(model), example, str(folder / "model.onnx"), dynamo=True,
                          input_names=inputs, output_names=outputs, dynamic_shapes=dynamic,
                          external_data=False, verbose=False)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# --- int8 -----------------------------------------------------------------------------------

INT8_WEIGHTS = "model.int8.safetensors"


def quantize_dynamic(model):
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def write_int8(model, tokenizer, folder: Path) -> None:
    """Dynamic int8 (per-output-channel weights, activations quantized on the fly) for CPU.

    Stored as plain tensors: for each Linear `<name>.qweight` (int8), `.scales`, `.zero_points`
    and `.bias`; every other parameter (norms, an untied embedding) in float32. A tied input
    embedding is not stored: `load_int8` rebuilds it from the int8 LM head, as llama.cpp's q8_0
    shares one quantized token table.
    """
    from safetensors.torch import save_file

    quantized = quantize_dynamic(model)
    tensors, linear_names = int8_linear_tensors(quantized)
    skip = {_tied_embedding_name(model)} if _tied(model, linear_names) else set()
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner not in linear_names and name not in skip and not name.endswith("rotary_emb.inv_freq"):
            tensors[name] = tensor.detach().contiguous().clone()
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / INT8_WEIGHTS), metadata={"format": "distil-int8-dynamic"})
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def int8_linear_tensors(quantized) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Plain tensors of every dynamic-int8 Linear of a `quantize_dynamic`-ed model: `<name>.qweight`
    (int8), `.scales`, `.zero_points` and `.bias`; and the names of those Linears."""
    tensors: dict[str, torch.Tensor] = {}
    linear_names = set()
    for name, module in quantized.named_modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            weight, bias = module._weight_bias()
            linear_names.add(name)
            tensors[f"{name}.qweight"] = weight.int_repr().contiguous()
            tensors[f"{name}.scales"] = weight.q_per_channel_scales().float().contiguous()
            tensors[f"{name}.zero_points"] = weight.q_per_channel_zero_points().contiguous()
            if bias is not None:
                tensors[f"{name}.bias"] = bias.detach().contiguous()
    return tensors, linear_names


def set_int8_linears(quantized, tensors: dict[str, torch.Tensor], weights: Path) -> set[str]:
    """Load the int8 Linear tensors (popped from `tensors`) into a `quantize_dynamic`-ed model;
    returns the Linears' names. A missing tensor raises a DistilError naming `weights`."""
    linear_names = set()
    for name, module in quantized.named_modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            if f"{name}.qweight" not in tensors:
                raise DistilError(f"int8 export lacks tensor {name}.qweight", file=str(weights), field="model")
            qweight = torch._make_per_channel_quantized_tensor(
                tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.scales").double(),
                tensors.pop(f"{name}.zero_points"), 0)
            module.set_weight_bias(qweight, tensors.pop(f"{name}.bias", None))
            linear_names.add(name)
    return linear_names


def copy_float_tensors(model, tensors: dict[str, torch.Tensor], weights: Path) -> None:
    """Copy named float tensors into a model's parameters / buffers, one by one (quantized modules
    refuse a partial load_state_dict)."""
    with torch.no_grad():
        for name, tensor in tensors.items():
            try:
                target = model.get_parameter(name)
            except AttributeError:
                try:
                    target = model.get_buffer(name)
                except AttributeError:
                    raise DistilError(f"int8 export has an unknown tensor '{name}'", file=str(weights),
                                      field="model") from None
            target.copy_(tensor)


def _tied_embedding_name(model) -> str:
    embedding = model.get_input_embeddings()
    return next(f"{n}.weight" for n, m in model.named_modules() if m is embedding)


def _tied(model, linear_names: set[str]) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and "lm_head" in linear_names


def load_int8(folder: Path | str):
    """Rebuild an int8 export: model from config, dynamic quantization, then the stored int8 tensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    weights = folder / INT8_WEIGHTS
    if not weights.exists():
        raise DistilError(f"not an int8 export (no {INT8_WEIGHTS})", file=str(folder), field="model")
    tensors = load_file(str(weights))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
    embedding_name = _tied_embedding_name(model)
    model = quantize_dynamic(model)
    linear_names = set_int8_linears(model, tensors, weights)
    if _tied(model, linear_names) and embedding_name not in tensors:
        tensors[embedding_name] = model.lm_head._weight_bias()[0].dequantize()
    copy_float_tensors(model, tensors, weights)
    return model.eval()
