"""One small interface over the runtimes an exported model runs in, so every export is scored
and timed by the same code.

A runtime has `forward(input_ids, attention_mask, position_ids, past) -> (logits, present)`:
`past` is None on the first call and whatever the previous call returned after that.
  - TorchRuntime: a transformers model (fp32 Hugging Face folder, int8 export, or a GGUF file
    dequantized by transformers' GGUF loader);
  - OnnxRuntime: an onnxruntime session over an ONNX export with KV-cache inputs and outputs;
  - LlamaCppRuntime: llama.cpp over a GGUF file (the `llama` extra), one row at a time.
`greedy` and `open_runtime` build on that. A runtime's `max_rows` (None: any) caps a batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from distil.errors import DistilError
from distil.generation.decoding import left_pad


class TorchRuntime:
    max_rows = None

    def __init__(self, model, name: str = "torch"):
        self.model, self.name = model.eval(), name

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask, position_ids, past=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=past, use_cache=True)
        return out.logits.float(), out.cache


class OnnxRuntime:
    max_rows = None

    def __init__(self, folder: Path | str, threads: int | None = None):
        from distil.errors import require

        require("onnxruntime", "onnx")
        import onnxruntime as ort
        from transformers import AutoConfig

        from distil.deploy.export import kv_shape, onnx_io_names

        folder = Path(folder)
        if not (folder / "model.onnx").exists():
            raise DistilError("not an ONNX export (no model.onnx)", file=str(folder), field="model")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        config = AutoConfig.from_pretrained(folder)
        self.heads, self.head_dim = kv_shape(config)
        self.inputs, self.outputs = onnx_io_names(config.num_hidden_layers)
        self.name = "onnxruntime"

    def forward(self, input_ids, attention_mask, position_ids, past=None):
        batch = input_ids.shape[0]
        if past is None:
            empty = np.zeros((batch, self.heads, 0, self.head_dim), dtype=np.float32)
            past = [empty] * (len(self.inputs) - 3)
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
                 "position_ids": position_ids.numpy()}
        feeds.update(zip(self.inputs[3:], past))
        logits, *present = self.session.run(self.outputs, feeds)
        return torch.from_numpy(logits), present


class LlamaCppRuntime:
    """llama.cpp (llama-cpp-python) over a .gguf file: what a GGUF export scores and runs at as shipped.

    llama.cpp's context holds one sequence here, so a batch is one row (`max_rows`); `past` is
    the number of tokens already in the context.
    """
    max_rows = 1

    def __init__(self, path: Path | str, threads: int | None = None, context: int = 2048):
        from distil.errors import require

        require("llama_cpp", "llama")
        import llama_cpp

        self.path, self.context, self.name = Path(path), context, "llama.cpp"
        self.llm = llama_cpp.Llama(str(path), n_ctx=context, logits_all=True, verbose=False,
                                   n_threads=threads or torch.get_num_threads())

    def forward(self, input_ids, attention_mask, position_ids, past=None):
        if input_ids.shape[0] != 1:
            raise DistilError(f"{self.path}: llama.cpp runs one row at a time, got {input_ids.shape[0]}")
        if not attention_mask[0, -input_ids.shape[1]:].all():
            raise DistilError(f"{self.path}: llama.cpp rows take no padding")
        tokens = input_ids[0].tolist()
        start = 0 if past is None else past
        if start + len(tokens) > self.context:
            raise DistilError(f"{self.path}: {start + len(tokens)} tokens exceed llama.cpp's context of {self.context}")
        self.llm.n_tokens = start  # eval drops whatever the context held after `start`
        self.llm.eval(tokens)
        logits = torch.from_numpy(np.array(self.llm.scores[start:self.llm.n_tokens], dtype=np.float32))
        return logits[None], self.llm.n_tokens


def open_runtime(path: Path | str):
    """The runtime for an artifact: a HF folder, an int8 or ONNX export folder, or a .gguf file.

    A .gguf file runs in llama.cpp where the `llama` extra is installed, and otherwise through
    transformers' GGUF loader (dequantized to fp32: the file's numbers, not llama.cpp's speed).
    """
    import importlib.util

    from distil.deploy.export import MARKER, load_gguf_as_transformers, load_int8

    path = Path(path)
    if path.suffix == ".gguf":
        if importlib.util.find_spec("llama_cpp") is not None:
            return LlamaCppRuntime(path)
        return TorchRuntime(load_gguf_as_transformers(path), "transformers GGUF loader (dequantized)")
    fmt = json.loads((path / MARKER).read_text())["format"] if (path / MARKER).exists() else "hf"
    if fmt == "onnx":
        return OnnxRuntime(path)
    if fmt == "int8":
        return TorchRuntime(load_int8(path), "torch int8 dynamic")
    from distil.models.sources import load_causal_lm

    return TorchRuntime(load_causal_lm(path, device="cpu"), "torch")


def greedy(runtime, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: set[int], pad_id: int,
           stop_early: bool = True) -> list[list[int]]:
    """Greedy continuation of left-padded prompts with the runtime's KV cache.

    Position ids follow the attention mask, so a row's tokens do not depend on its neighbours'
    lengths. With `stop_early`, generation ends once every row has emitted a stop token.
    """
    input_ids, mask = left_pad(prompts, pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, past = runtime.forward(input_ids, mask, positions, None)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        chosen = logits[:, -1].argmax(-1)
        for i, token in enumerate(chosen.tolist()):
            if not done[i]:
                out[i].append(token)
                done[i] = stop_early and token in stop_ids
        if step == max_new_tokens - 1 or all(done):
            break
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        positions = positions[:, -1:] + 1
        logits, past = runtime.forward(chosen[:, None], mask, positions, past)
    return out
