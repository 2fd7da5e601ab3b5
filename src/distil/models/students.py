"""Students: built from a teacher's layers (optionally narrowed MLP) or a config, and checked against the teacher before any work."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from distil.errors import DistilError
from distil.models import sources


def _mlp_neurons(layer, keep: int) -> torch.Tensor:
    """The `keep` most important MLP neurons of a gated MLP layer, by the product of weight norms."""
    mlp = layer.mlp
    score = mlp.down_proj.weight.norm(dim=0)
    for name in ("gate_proj", "up_proj"):
        if hasattr(mlp, name):
            score = score * getattr(mlp, name).weight.norm(dim=1)
    return score.topk(keep).indices.sort().values


def _check_from_teacher(teacher_config, layers: list[int], intermediate_size: int | None,
                        field: str = "student.from_teacher") -> None:
    source = "teacher" if field == "student.from_teacher" else "model"
    n_teacher = teacher_config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if bad:
        raise DistilError(f"layer indices {bad} out of range: the {source} has {n_teacher} layers (0..{n_teacher - 1})",
                          field=f"{field}.layers")
    if intermediate_size is not None and intermediate_size > teacher_config.intermediate_size:
        raise DistilError(f"intermediate_size {intermediate_size} is larger than the {source}'s "
                          f"{teacher_config.intermediate_size}", field=f"{field}.intermediate_size")


def student_from_teacher(teacher, layers: list[int], intermediate_size: int | None = None,
                         field: str = "student.from_teacher"):
    """A smaller model of the teacher's architecture, initialised from the teacher's weights.

    Args:
        teacher: a loaded causal LM with `model.layers` (Llama-style decoders).
        layers: teacher layer indices the student keeps, in order (e.g. [0, 29]).
        intermediate_size: keep this many MLP neurons per layer (the most important ones).

    Returns:
        A new model; embeddings, final norm and LM head copied, each kept layer copied and,
        where narrowed, sliced to the chosen neurons.
    """
    _check_from_teacher(teacher.config, layers, intermediate_size, field)
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [teacher.config.layer_types[i] for i in layers]
    if intermediate_size is not None:
        config.intermediate_size = intermediate_size
    student = AutoModelForCausalLM.from_config(config, dtype=next(teacher.parameters()).dtype)
    teacher_state = teacher.state_dict()
    new_state = {}
    for key, value in student.state_dict().items():
        source_key, neurons = key, None
        if key.startswith("model.layers."):
            j, rest = key[len("model.layers."):].split(".", 1)
            t_layer = layers[int(j)]
            source_key = f"model.layers.{t_layer}.{rest}"
            if intermediate_size is not None and ".mlp." in key:
                neurons = _mlp_neurons(teacher.model.layers[t_layer], intermediate_size)
        src = teacher_state[source_key]
        if neurons is not None:
            for dim, (have, want) in enumerate(zip(src.shape, value.shape)):
                if have != want:
                    src = src.index_select(dim, neurons)
        new_state[key] = src.clone()
    student.load_state_dict(new_state)
    return student


def build_student(recipe_student, teacher, student_dir: Path | None = None):
    """The student described by the recipe's `student` section (untrained)."""
    if recipe_student.model is not None:
        resolved = sources.resolve(recipe_student.model, field="student.model")
        return AutoModelForCausalLM.from_pretrained(resolved.directory, dtype=sources.DTYPES[recipe_student.dtype])
    if recipe_student.from_teacher is not None:
        spec = recipe_student.from_teacher
        return student_from_teacher(teacher, spec.layers, spec.intermediate_size)
    if recipe_student.from_model is not None:
        spec = recipe_student.from_model
        source = sources.load_causal_lm(sources.resolve(spec.model, field="student.from_model.model").directory, device="cpu")
        return student_from_teacher(source, spec.layers, spec.intermediate_size,
                                    field="student.from_model").to(sources.DTYPES[recipe_student.dtype])
    config = AutoConfig.for_model(**{**teacher.config.to_dict(), **recipe_student.config})
    return AutoModelForCausalLM.from_config(config, dtype=sources.DTYPES[recipe_student.dtype])


def student_config(recipe_student, teacher_config):
    """The config the recipe's student will have, known without building it (or loading the teacher)."""
    if recipe_student.model is not None:
        return AutoConfig.from_pretrained(sources.resolve(recipe_student.model, field="student.model").directory)
    if recipe_student.from_teacher is not None:
        spec = recipe_student.from_teacher
        _check_from_teacher(teacher_config, spec.layers, spec.intermediate_size)
        changes = {"num_hidden_layers": len(spec.layers)}
        if spec.intermediate_size is not None:
            changes["intermediate_size"] = spec.intermediate_size
        return AutoConfig.for_model(**{**teacher_config.to_dict(), **changes})
    if recipe_student.from_model is not None:
        spec = recipe_student.from_model
        base = AutoConfig.from_pretrained(sources.resolve(spec.model, field="student.from_model.model").directory)
        _check_from_teacher(base, spec.layers, spec.intermediate_size, "student.from_model")
        changes = {"num_hidden_layers": len(spec.layers)}
        if spec.intermediate_size is not None:
            changes["intermediate_size"] = spec.intermediate_size
        if getattr(base, "layer_types", None):
            changes["layer_types"] = [base.layer_types[i] for i in spec.layers]
        return AutoConfig.for_model(**{**base.to_dict(), **changes})
    return AutoConfig.for_model(**{**teacher_config.to_dict(), **recipe_student.config})


def student_tokenizer_source(recipe_student) -> tuple[Path, str] | None:
    """(directory, recipe field) of the student's own tokenizer, when it brings one (None: the teacher's)."""
    for field, source in (("student.model", recipe_student.model),
                          ("student.from_model.model", recipe_student.from_model and recipe_student.from_model.model)):
        if source is not None:
            directory = Path(sources.resolve(source, field=field).directory)
            if (directory / "tokenizer_config.json").exists() or (directory / "tokenizer.json").exists():
                return directory, field
    return None


def config_param_count(config) -> int:
    """Parameters of a causal LM with this config, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return sources.count_params(AutoModelForCausalLM.from_config(config))


def check_pairing(recipe_student, teacher_dir: Path, teacher_tokenizer, compare_size: bool = True,
                  cross_tokenizer: str | None = None) -> None:
    """Fail before any work when the student cannot learn from this teacher.

    The student must read the teacher's token ids (same tokenizer, a vocabulary at least as
    large), or, with `cross_tokenizer`, bring a tokenizer of its own that its vocabulary
    covers; with `compare_size`, it must be smaller than the teacher.
    """
    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    try:
        config = student_config(recipe_student, teacher_config)
    except (ValueError, TypeError, KeyError) as e:
        raise DistilError(f"cannot build the student's config: {e}", field="student") from None
    own = student_tokenizer_source(recipe_student)
    tokenizer = teacher_tokenizer
    if own is not None:
        student_tokenizer = sources.load_tokenizer(own[0])
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            if cross_tokenizer is None:
                raise DistilError(
                    f"the student's tokenizer ({len(student_tokenizer):,} tokens) differs from the teacher's "
                    f"({len(teacher_tokenizer):,}); set train.cross_tokenizer (offsets, uld or both) to distil "
                    "across tokenizers", field=own[1])
            tokenizer = student_tokenizer
    if cross_tokenizer is not None and tokenizer is teacher_tokenizer:
        raise DistilError("train.cross_tokenizer is set but the student reads the teacher's tokenizer "
                          "(give student.model or student.from_model with a tokenizer of its own, or drop the key)",
                          field="train.cross_tokenizer")
    whose = "the teacher tokenizer's" if tokenizer is teacher_tokenizer else "its tokenizer's"
    if config.vocab_size < len(tokenizer):
        raise DistilError(f"the student's vocabulary has {config.vocab_size:,} entries, fewer than "
                          f"{whose} {len(tokenizer):,} tokens", field="student")
    if not compare_size:
        return
    student_params, teacher_params = config_param_count(config), config_param_count(teacher_config)
    if student_params >= teacher_params:
        raise DistilError(f"the student has {student_params:,} parameters, not fewer than the teacher's "
                          f"{teacher_params:,}", field="student")


