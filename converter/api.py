"""Convert a Keras model into a trainable, builtin-only ``.tflite`` + manifest."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from converter import ops
from converter.activations import Activation
from converter.errors import UnsupportedModelError, VerificationError
from converter.graph import MODEL_STATE, GraphSpec, TrainingModule, boundary_shape, to_tflite
from converter.losses import LOSSES, Head, canonical_loss
from converter.lowering import lower_model
from converter.optimizers import OPTIMIZERS, OptimizerConfig
from converter.spec import load_model
from converter.verify import VerificationReport, random_batches, verify_against_keras
from edge_client import __version__
from edge_client.durable import atomic_write
from edge_client.errors import ModelFileError
from edge_client.manifest import Manifest, manifest_path_for, save_manifest
from edge_client.model_file import require_builtin_only, sha256_hex
from edge_client.runtime import TrainableModel
from edge_client.weights import TensorSpec

_LOSS_CLASS_NAMES = {
    "SparseCategoricalCrossentropy": "sparse_categorical_crossentropy",
    "CategoricalCrossentropy": "categorical_crossentropy",
    "BinaryCrossentropy": "binary_crossentropy",
    "MeanSquaredError": "mean_squared_error",
    "MeanAbsoluteError": "mean_absolute_error",
    "Huber": "huber",
}
_FUSABLE = {
    "sparse_categorical_crossentropy": "softmax",
    "categorical_crossentropy": "softmax",
    "binary_crossentropy": "sigmoid",
}
_LOSS_OPTIONS = {"label_smoothing": 0.0, "delta": 1.0}  # Head fields read from the compiled loss, and their defaults


@dataclass(frozen=True)
class ConvertConfig:
    """How to convert. ``None`` means: take it from the compiled model, else the default.

    A setting given here replaces the compiled one before the compiled one is
    read, so it is also the fix for a compiled setting litefed refuses:
    ``optimizer`` replaces the whole compiled optimizer (Keras' defaults for
    what is not given), ``learning_rate`` a compiled schedule, any of the
    clipping options the compiled clipping, ``loss`` the compiled loss.
    """

    batch_size: int
    loss: str | None = None
    from_logits: bool | None = None
    optimizer: str | None = None
    learning_rate: float | None = None
    label_smoothing: float | None = None
    huber_delta: float | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    clipnorm: float | None = None
    clipvalue: float | None = None
    global_clipnorm: float | None = None
    verify: bool = True
    verify_steps: int = 3
    tolerance: float = 1e-4
    seed: int = 0  # verification batches, and the initial weights of a model built from a SPEC
    model_state: str = "federated"  # BatchNormalization statistics: averaged like weights, or "local"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UnsupportedModelError(f"batch size must be >= 1, got {self.batch_size}")
        if self.model_state not in MODEL_STATE:
            raise UnsupportedModelError(
                f"model state {self.model_state!r} is not supported; choose one of {', '.join(MODEL_STATE)}"
            )


@dataclass(frozen=True)
class ConvertedModel:
    """The serialized model, its manifest and what verification measured."""

    tflite: bytes
    manifest: Manifest
    report: VerificationReport | None

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``path`` (.tflite) and its manifest beside it; return both paths."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, self.tflite)
        manifest_path = manifest_path_for(path)
        save_manifest(self.manifest, manifest_path)
        return path, manifest_path


def resolve_loss(model: keras.Model, config: ConvertConfig) -> tuple[str, bool]:
    """Loss name and from_logits: the flags win, then the compiled loss.

    ``--loss`` replaces the compiled loss before it is examined, so options
    litefed refuses there (label smoothing, ``ignore_class``, an unknown
    loss) no longer matter. ``from_logits`` describes the model's output,
    so without ``--from-logits`` it is still read from the compiled loss.
    """
    compiled = getattr(model, "loss", None)
    from_logits = _compiled_from_logits(compiled)
    if config.from_logits is not None:
        from_logits = config.from_logits
    if config.loss is not None:
        return canonical_loss(config.loss), from_logits
    return _from_keras_loss(compiled), from_logits


def _compiled_from_logits(compiled: object) -> bool:
    if isinstance(compiled, keras.losses.Loss):
        return bool(compiled.get_config().get("from_logits", False))
    return False


def _from_keras_loss(compiled: object) -> str:
    """The canonical name of the compiled loss, refusing what the head cannot compute."""
    choices = "|".join(LOSSES)
    if compiled is None:
        raise UnsupportedModelError(f"the model is not compiled with a loss; pass --loss {choices}")
    if isinstance(compiled, str):
        name = compiled
    elif isinstance(compiled, keras.losses.Loss):
        name = _LOSS_CLASS_NAMES.get(type(compiled).__name__, type(compiled).__name__)
    else:
        name = getattr(compiled, "__name__", repr(compiled))
    try:
        name = canonical_loss(name)
    except UnsupportedModelError:
        raise UnsupportedModelError(
            f"compiled loss {name} is not supported; pass --loss {choices} to replace it"
        ) from None
    cfg = compiled.get_config() if isinstance(compiled, keras.losses.Loss) else {}
    if cfg.get("ignore_class") is not None:  # class 0 can be the ignored one
        raise UnsupportedModelError(
            f"compiled loss option ignore_class={cfg['ignore_class']!r} is not supported; "
            f"pass --loss {name} to train without it"
        )
    return name


def resolve_loss_options(model: keras.Model, config: ConvertConfig) -> dict[str, float]:
    """The loss head's ``label_smoothing`` and Huber ``delta``: the flags win, then the compiled loss.

    With ``--loss`` the compiled loss is not read (Keras' defaults). Only
    values that differ from the defaults are returned.
    """
    compiled = getattr(model, "loss", None)
    options: dict[str, float] = {}
    if config.loss is None and isinstance(compiled, keras.losses.Loss):
        # Keras' Huber leaves delta out of get_config (and so out of a saved .keras): read its kwargs too.
        cfg = {**getattr(compiled, "_fn_kwargs", {}), **compiled.get_config()}
        options = {k: _f32(cfg[k]) for k in _LOSS_OPTIONS if cfg.get(k) is not None}
    flags = {"label_smoothing": config.label_smoothing, "delta": config.huber_delta}
    options.update({k: v for k, v in flags.items() if v is not None})
    return {k: v for k, v in options.items() if v != _LOSS_OPTIONS[k]}


def resolve_optimizer(model: keras.Model, config: ConvertConfig) -> OptimizerConfig:
    """Optimizer settings: the flags win, then the compiled optimizer, then SGD 0.01.

    ``config.optimizer`` replaces the compiled optimizer without reading it
    (Keras' defaults for that optimizer, then the other flags); otherwise the
    compiled one is read, skipping the settings the flags replace.
    """
    compiled = getattr(model, "optimizer", None)
    if config.optimizer is not None or compiled is None:
        name = config.optimizer or "sgd"
        base: dict[str, Any] = {"name": name, "learning_rate": _KERAS_DEFAULT_LR.get(name, 0.001)}
    else:
        base = _from_keras_optimizer(compiled, config)
    flags = {
        "learning_rate": config.learning_rate,
        "momentum": config.momentum,
        "nesterov": config.nesterov,
        "weight_decay": config.weight_decay,
    }
    base.update({k: v for k, v in flags.items() if v is not None})
    clipping = {"clipnorm": config.clipnorm, "clipvalue": config.clipvalue, "global_clipnorm": config.global_clipnorm}
    if any(v is not None for v in clipping.values()):
        base.update(clipping)  # a clipping flag replaces the compiled clipping, whichever kind it was
    return OptimizerConfig(**base)


_KERAS_DEFAULT_LR = {"sgd": 0.01}  # every other Keras optimizer defaults to 0.001
_KERAS_OPTIMIZERS = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw", "RMSprop": "rmsprop", "Adagrad": "adagrad"}
_OPTIMIZER_FIELDS = {  # Keras config keys each optimizer contributes, besides learning rate, decay and clipping
    "sgd": ("momentum", "nesterov"),
    "adam": ("beta_1", "beta_2", "epsilon"),
    "adamw": ("beta_1", "beta_2", "epsilon"),
    "rmsprop": ("rho", "momentum", "epsilon", "centered"),
    "adagrad": ("initial_accumulator_value", "epsilon"),
}


def _from_keras_optimizer(opt: keras.optimizers.Optimizer, config: ConvertConfig) -> dict[str, Any]:
    """``OptimizerConfig`` keyword arguments read from a compiled optimizer; refuses what cannot run."""
    cfg = opt.get_config()
    name = _KERAS_OPTIMIZERS.get(type(opt).__name__)
    if name is None:
        raise UnsupportedModelError(
            f"compiled optimizer {type(opt).__name__} is not supported; "
            f"pass --optimizer {'|'.join(OPTIMIZERS)} to replace it"
        )
    replace = f"pass --optimizer {name} to replace the compiled optimizer with a plain one"
    for key in ("use_ema", "amsgrad", "gradient_accumulation_steps", "loss_scale_factor"):
        if cfg.get(key):
            raise UnsupportedModelError(f"optimizer option {key}={cfg[key]!r} is not supported; {replace}")
    out: dict[str, Any] = {"name": name}
    if config.learning_rate is None:  # --learning-rate replaces a compiled schedule with a constant rate
        lr = cfg.get("learning_rate")
        if isinstance(lr, dict):  # a serialized schedule: train computes it from optimizer/iterations
            from converter.optimizers import Schedule  # local: only this function of api.py needs it

            schedule = Schedule.from_keras(lr)
            out.update(schedule=schedule, learning_rate=_f32(schedule.base_rate))
        elif isinstance(lr, (int, float)):
            out["learning_rate"] = _f32(lr)
        else:
            raise UnsupportedModelError(
                f"learning rate {lr!r} is not supported; pass --learning-rate LR for a constant rate"
            )
    for key in _OPTIMIZER_FIELDS[name]:
        value = cfg[key]
        out[key] = value if isinstance(value, bool) else _f32(value)
    if cfg.get("weight_decay") is not None:
        out["weight_decay"] = _f32(cfg["weight_decay"])
    for key in ("clipnorm", "clipvalue", "global_clipnorm"):
        if cfg.get(key) is not None:
            out[key] = _f32(cfg[key])
    return out


def _f32(value: float) -> float:
    """Keras keeps hyper-parameters as float32; record 0.3, not 0.30000001192092896."""
    return float(str(np.float32(value)))


def _static_shape(tensor, what: str) -> tuple[int, ...]:
    shape = tuple(tensor.shape[1:])
    if any(d is None for d in shape):
        raise UnsupportedModelError(f"the model's {what} shape {shape} must be fully defined (except the batch)")
    return shape


def _input_dtype(model: keras.Model) -> str:
    """``float32``, or ``int32`` for integer inputs (token ids into an Embedding)."""
    dtype = str(model.inputs[0].dtype)
    if dtype.startswith(("int", "uint")):
        return "int32"
    if dtype != "float32":
        raise UnsupportedModelError(f"the model's input dtype {dtype} is not supported; use float32 or an integer")
    return "float32"


def build_graph_spec(
    model: keras.Model, config: ConvertConfig, optimizer: OptimizerConfig, dropout: bool = True
) -> tuple[GraphSpec, bool]:
    """Lower ``model`` and attach its head; return the spec and from_logits."""
    loss, from_logits = resolve_loss(model, config)
    lowered = lower_model(model)
    out_shape = _static_shape(model.outputs[0], "output")
    if len(out_shape) != 1:
        raise UnsupportedModelError(f"the model output must be a vector per example, got shape {out_shape}")
    if loss == "sparse_categorical_crossentropy" and out_shape[0] < 2:
        raise UnsupportedModelError("sparse categorical cross-entropy needs at least 2 outputs")
    last = lowered[-1]
    fused = not from_logits and isinstance(last, Activation) and last.kind == _FUSABLE.get(loss)
    if fused:
        lowered = lowered[:-1]
    if not dropout:
        lowered = [dataclasses.replace(op, active=False) if isinstance(op, ops.Dropout) else op for op in lowered]
    options = resolve_loss_options(model, config)
    head = Head(loss, on_logits=from_logits or fused, num_outputs=out_shape[0], **options)
    _require_loss_options(head, options)
    spec = GraphSpec(
        tuple(lowered),
        head,
        optimizer,
        config.batch_size,
        _static_shape(model.inputs[0], "input"),
        input_dtype=_input_dtype(model),
        model_state=config.model_state,
    )
    return spec, from_logits


def _manifest(
    model: keras.Model, spec: GraphSpec, module: TrainingModule, tflite: bytes, from_logits: bool
) -> Manifest:
    b, head = spec.batch_size, spec.head
    state = [
        TensorSpec(n, boundary_shape(v.shape), "float32")
        for n, v in zip(module.state_names(), module.state_variables(), strict=True)
    ]
    outputs = ["loss", "correct"] if head.task != "regression" else ["loss"]
    model_state = tuple(TensorSpec(s.name, boundary_shape(s.initial.shape), "float32") for s in spec.state)
    trainable = tuple(TensorSpec(p.name, boundary_shape(p.initial.shape), "float32") for p in spec.params)
    federated = trainable + (model_state if spec.model_state == "federated" else ())
    local = () if spec.model_state == "federated" else model_state
    weight_names = module.tensor_names()
    return Manifest(
        model_name=model.name,
        task=head.task,
        batch_size=b,
        input=TensorSpec("x", (b, *spec.input_shape), spec.input_dtype),
        label=TensorSpec("y", tuple(head.label_shape(b)), head.label_dtype.name),
        output=TensorSpec("output", (b, head.num_outputs), "float32"),
        num_classes=head.num_outputs if head.task == "multiclass" else (2 if head.task == "binary" else 0),
        loss={"name": head.loss, "from_logits": from_logits, **head.options},
        optimizer=spec.optimizer.to_json(),
        weights=federated,
        optimizer_state=tuple(state),
        local_state=local,
        signatures={
            "train": {"inputs": ["x", "y", "sample_weight", "lr", "mu"], "outputs": outputs},
            "infer": {"inputs": ["x"], "outputs": ["output"]},
            "evaluate": {"inputs": ["x", "y", "sample_weight"], "outputs": ["loss_sum", *outputs[1:]]},
            "get_weights": {"inputs": [], "outputs": weight_names},
            "set_weights": {"inputs": weight_names, "outputs": ["count"]},
        },
        model_sha256=sha256_hex(tflite),
        converter_version=__version__,
    )


def convert_model(
    model: keras.Model, config: ConvertConfig, log: Callable[[str], None] = lambda _: None
) -> ConvertedModel:
    """Convert an in-memory Keras model; verify it unless ``config.verify`` is False."""
    optimizer = resolve_optimizer(model, config)
    spec, from_logits = build_graph_spec(model, config, optimizer)
    module = TrainingModule(spec)
    log(f"lowered {len(spec.ops)} ops, {sum(p.initial.size for p in spec.params):,} parameters; converting")
    with tempfile.TemporaryDirectory(prefix="litefed-") as tmp:
        tflite = to_tflite(module, tmp)
    _require_builtin_only(tflite)
    manifest = _manifest(model, spec, module, tflite, from_logits)
    report = None
    if config.verify:
        report = _verify(model, config, optimizer, spec, tflite, manifest, log)
        manifest = dataclasses.replace(manifest, verification=report.to_json())
    return ConvertedModel(tflite, manifest, report)


_LOSS_OPTION_FLAGS = {"label_smoothing": "label-smoothing", "delta": "huber-delta"}
_LOSS_OPTION_OWNER = {"label_smoothing": "categorical_crossentropy", "delta": "huber"}


def _require_loss_options(head: Head, wanted: dict[str, float]) -> None:
    """Refuse to train a loss other than the one asked for (an option the head did not take)."""
    for key, value in wanted.items():
        if head.options.get(key) != value:
            raise UnsupportedModelError(
                f"loss option {key}={value!r} is not supported for {head.loss}; "
                f"leave out --{_LOSS_OPTION_FLAGS[key]}, or pass --loss {_LOSS_OPTION_OWNER[key]}"
            )


def _require_builtin_only(tflite: bytes) -> None:
    """Refuse to produce a model the plain LiteRT interpreter cannot run (even with --no-verify)."""
    try:
        require_builtin_only(tflite)
    except ModelFileError as exc:
        raise VerificationError(str(exc)) from exc


def _verify(model, config, optimizer, spec, tflite, manifest, log) -> VerificationReport:
    has_dropout = any(isinstance(op, ops.Dropout) and op.rate > 0 for op in spec.ops)
    if has_dropout:
        # Random masks cannot match TensorFlow's; verify the same graph with dropout off,
        # and check that the real model trains to a finite loss.
        real = TrainableModel(tflite, manifest)
        batch = random_batches(manifest, 1, config.seed)[0]
        if not np.isfinite(real.train_step(batch.x, batch.y, batch.sample_weight).loss):
            raise VerificationError("the converted model's train step returned a non-finite loss")
        twin_spec, from_logits = build_graph_spec(model, config, optimizer, dropout=False)
        twin = TrainingModule(twin_spec)
        with tempfile.TemporaryDirectory(prefix="litefed-") as tmp:
            twin_tflite = to_tflite(twin, tmp)
        tflite, manifest = twin_tflite, _manifest(model, twin_spec, twin, twin_tflite, from_logits)
        log("model has dropout: verifying its dropout-free twin against TensorFlow")
    report = verify_against_keras(
        model, tflite, manifest, optimizer, config.verify_steps, config.tolerance, config.seed
    )
    log(
        f"verified {report.steps} train steps against TensorFlow: max |diff| loss {report.loss_max_abs_diff:.2e}, "
        f"weights {report.weights_max_abs_diff:.2e}, infer {report.infer_max_abs_diff:.2e}"
    )
    return report


def convert(
    model: keras.Model | str, output: str | Path, config: ConvertConfig, log: Callable[[str], None] = lambda _: None
) -> ConvertedModel:
    """Load ``model`` if it is a SPEC, convert, verify and write OUT.tflite + OUT.json."""
    if isinstance(model, str):
        # A ``file.py:function`` SPEC builds the model here: seeding first makes its initial
        # weights (and so every federation started from them) the same on every conversion.
        keras.utils.set_random_seed(config.seed)
        model = load_model(model)
    converted = convert_model(model, config, log)
    model_path, manifest_path = converted.save(output)
    log(f"wrote {model_path} ({len(converted.tflite) / 1e6:.1f} MB) and {manifest_path}")
    return converted
