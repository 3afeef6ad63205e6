"""``evotune convert xtuner-config``: an XTuner v0.1 config -> an evotune config.

The XTuner file imports mmengine and xtuner, which need not be installed: it is
read, not run. Its statements are evaluated one by one over plain values (numbers,
strings, lists, dicts, ``accumulative_counts *= sequence_parallel_size``, ``if
use_varlen_attn:``), and every imported name stays a symbol that knows its dotted
path, so ``dict(type=AdamW, ...)`` reads as ``{'type': <torch.optim.AdamW>, ...}``.
A statement that cannot be read that way is reported and the rest is still read.

Every key of the XTuner runner config is accounted for in the printed table:
mapped, ignored with the reason, or NOT REPRODUCED. A key that changes the training
math and cannot be honoured stops the conversion unless ``allow_approximate``; a
scheduler, dataset or sampler type evotune cannot read stops it always.

XTuner runs are reproduced as XTuner computes them: its packs (pack_mode='xtuner':
labels shifted over the whole pack, a fragment's last token targets the next
fragment's first), its sampler order (InternRepoSampler order='xtuner'), mmengine's
LinearLR + CosineAnnealingLR stepped once per micro-batch, and a token-mean loss per
micro-batch averaged over accumulation (loss_reduction='pack').
"""

from __future__ import annotations

import ast
import math
import operator
import os
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConversionError
from ..train.schedule import XTUNER_START_FACTOR
from .key_report import KeyReport

INF = int(1e9)  # mmengine's "no end"


@dataclass(frozen=True)
class Symbol:
    """An imported name (or an attribute of one), known only by its dotted path."""

    path: str

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def __repr__(self) -> str:
        return self.path


@dataclass(frozen=True)
class SymbolicCall:
    """A call of an imported function the converter does not run."""

    func: Symbol
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]

    def __repr__(self) -> str:
        inner = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs]
        return f"{self.func!r}({', '.join(inner)})"


class _Unreadable(Exception):
    """An expression the converter cannot evaluate without running XTuner."""


# ---------------------------------------------------------------------------
# reading the file


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_BUILTINS: dict[str, Callable[..., Any]] = {
    "dict": dict,
    "list": list,
    "tuple": tuple,
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "min": min,
    "max": max,
    "abs": abs,
    "round": round,
    "len": len,
    "sum": sum,
}


class _Reader:
    """Evaluates an XTuner config's statements over plain values and symbols."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.text = text
        self.namespace: dict[str, Any] = {}
        self.failures: list[str] = []
        self.imported_modules: set[str] = set()
        self.imported_names: set[str] = set()

    def run(self, statements: list[ast.stmt]) -> None:
        for statement in statements:
            try:
                self._statement(statement)
            except _Unreadable as error:
                source = ast.get_source_segment(self.text, statement) or ""
                first = source.splitlines()[0][:60] if source else type(statement).__name__
                self.failures.append(f"{self.path.name}:{statement.lineno}: {first} ({error})")

    def _statement(self, node: ast.stmt) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                self.imported_modules.add(alias.name)
                bound = alias.asname or alias.name.split(".")[0]
                dotted = alias.name if alias.asname else alias.name.split(".")[0]
                self.namespace[bound] = Symbol(dotted)
                self.imported_names.add(bound)
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            self.imported_modules.add(module)
            for alias in node.names:
                if alias.name == "*":
                    raise _Unreadable(f"'from {module} import *' hides which names it binds")
                bound = alias.asname or alias.name
                self.namespace[bound] = Symbol(f"{module}.{alias.name}")
                self.imported_names.add(bound)
        elif isinstance(node, ast.Assign):
            value = self.eval(node.value)
            for target in node.targets:
                self._assign(target, value)
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            self._assign(node.target, self.eval(node.value))
        elif isinstance(node, ast.AugAssign):
            if not isinstance(node.target, ast.Name):
                raise _Unreadable("augmented assignment to something other than a name")
            current = self._name(node.target.id)
            self.namespace[node.target.id] = self._binary(node.op, current, self.eval(node.value))
        elif isinstance(node, ast.If):
            self.run(node.body if self.eval(node.test) else node.orelse)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            return  # a docstring
        elif isinstance(node, ast.Pass):
            return
        else:
            raise _Unreadable(f"{type(node).__name__} statements are not evaluated")

    def _assign(self, target: ast.expr, value: Any) -> None:
        if isinstance(target, ast.Name):
            self.namespace[target.id] = value
            self.imported_names.discard(target.id)
        elif isinstance(target, ast.Tuple | ast.List):
            values = list(value)
            if len(values) != len(target.elts):
                raise _Unreadable("unpacking of a different length")
            for element, item in zip(target.elts, values, strict=True):
                self._assign(element, item)
        elif isinstance(target, ast.Subscript):
            container = self.eval(target.value)
            if not isinstance(container, dict | list):
                raise _Unreadable("item assignment into something other than a dict or list")
            container[self.eval(target.slice)] = value
        else:
            raise _Unreadable(f"assignment to {type(target).__name__}")

    def _name(self, name: str) -> Any:
        if name in self.namespace:
            return self.namespace[name]
        if name in _BUILTINS or name in ("True", "False", "None"):
            return _BUILTINS.get(name)
        raise _Unreadable(f"name {name!r} is not defined")

    def _binary(self, op: ast.operator, left: Any, right: Any) -> Any:
        function = _BINARY.get(type(op))
        if function is None or isinstance(left, Symbol) or isinstance(right, Symbol):
            raise _Unreadable(f"operator {type(op).__name__} on {left!r}, {right!r}")
        try:
            return function(left, right)
        except Exception as error:
            raise _Unreadable(f"{type(error).__name__}: {error}") from None

    def eval(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return self._name(node.id)
        if isinstance(node, ast.Attribute):
            base = self.eval(node.value)
            if isinstance(base, Symbol):
                return Symbol(f"{base.path}.{node.attr}")
            if isinstance(base, dict) and node.attr in base:  # mmengine ConfigDict access
                return base[node.attr]
            raise _Unreadable(f"attribute {node.attr!r} of {base!r}")
        if isinstance(node, ast.Subscript):
            base = self.eval(node.value)
            key = self.eval(node.slice)
            try:
                return base[key]
            except Exception as error:
                raise _Unreadable(f"{type(error).__name__}: {error}") from None
        if isinstance(node, ast.List):
            return [self.eval(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(self.eval(e) for e in node.elts)
        if isinstance(node, ast.Set):
            return {self.eval(e) for e in node.elts}
        if isinstance(node, ast.Dict):
            result: dict[Any, Any] = {}
            for key_node, value_node in zip(node.keys, node.values, strict=True):
                if key_node is None:
                    result.update(self.eval(value_node))
                else:
                    result[self.eval(key_node)] = self.eval(value_node)
            return result
        if isinstance(node, ast.BinOp):
            return self._binary(node.op, self.eval(node.left), self.eval(node.right))
        if isinstance(node, ast.UnaryOp):
            operand = self.eval(node.operand)
            if isinstance(node.op, ast.Not):
                return not operand
            if isinstance(node.op, ast.USub) and isinstance(operand, int | float):
                return -operand
            if isinstance(node.op, ast.UAdd) and isinstance(operand, int | float):
                return +operand
            raise _Unreadable(f"unary {type(node.op).__name__} on {operand!r}")
        if isinstance(node, ast.BoolOp):
            values = [self.eval(v) for v in node.values]
            if isinstance(node.op, ast.And):
                return next((v for v in values if not v), values[-1])
            return next((v for v in values if v), values[-1])
        if isinstance(node, ast.Compare):
            left = self.eval(node.left)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = self.eval(right_node)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self.eval(node.body) if self.eval(node.test) else self.eval(node.orelse)
        if isinstance(node, ast.JoinedStr):
            parts = []
            for value in node.values:
                if isinstance(value, ast.Constant):
                    parts.append(str(value.value))
                elif isinstance(value, ast.FormattedValue):
                    spec = self.eval(value.format_spec) if value.format_spec else ""
                    parts.append(format(self.eval(value.value), spec))
            return "".join(parts)
        if isinstance(node, ast.Call):
            return self._call(node)
        raise _Unreadable(f"{type(node).__name__} expressions are not evaluated")

    def _call(self, node: ast.Call) -> Any:
        func = self.eval(node.func)
        args = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                args.extend(self.eval(arg.value))
            else:
                args.append(self.eval(arg))
        kwargs: dict[str, Any] = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                kwargs.update(self.eval(keyword.value))
            else:
                kwargs[keyword.arg] = self.eval(keyword.value)
        if isinstance(func, Symbol):
            return SymbolicCall(func, tuple(args), tuple(kwargs.items()))
        if func in _BUILTINS.values():
            if any(isinstance(a, Symbol | SymbolicCall) for a in args) and func is not dict:
                raise _Unreadable(f"{func.__name__}() of a symbol")
            return func(*args, **kwargs)
        raise _Unreadable(f"call of {func!r}")


@dataclass
class XTunerFile:
    """What reading an XTuner config gave: its top-level names and what could not be read."""

    namespace: dict[str, Any]
    failures: list[str]
    modules: set[str]
    imported_names: set[str]


def read_xtuner_config(path: Path) -> XTunerFile:
    """Top-level names of an XTuner config, the statements not read, and its imports."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: cannot read the XTuner config ({error})") from None
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as error:
        raise ConversionError(f"{path}:{error.lineno}: syntax error: {error.msg}") from None
    reader = _Reader(path, text)
    reader.run(tree.body)
    return XTunerFile(
        reader.namespace, reader.failures, reader.imported_modules, reader.imported_names
    )


# ---------------------------------------------------------------------------
# the table


def _type_name(value: Any) -> str:
    """The name a ``type=`` names: a symbol's last component or a registry string."""
    if isinstance(value, Symbol):
        return value.name
    if isinstance(value, SymbolicCall):
        return value.func.name
    return str(value)


def _is(value: Any, *names: str) -> bool:
    return _type_name(value) in names


def _items(spec: Any) -> Iterator[tuple[str, Any]]:
    return (
        iter((k, v) for k, v in spec.items() if k != "type") if isinstance(spec, dict) else iter(())
    )


# ---------------------------------------------------------------------------
# conversion


_RUNNER_KEYS = {
    "model",
    "tokenizer",
    "train_dataset",
    "train_dataloader",
    "optim_wrapper",
    "param_scheduler",
    "train_cfg",
    "custom_hooks",
    "default_hooks",
    "env_cfg",
    "visualizer",
    "log_level",
    "load_from",
    "resume",
    "randomness",
    "log_processor",
    "launcher",
    "work_dir",
    "strategy",
    "runner_type",
}
_SILENT_RUNNER_KEYS = {
    "env_cfg": "cudnn/multiprocessing/backend: evotune picks them for the device",
    "visualizer": "evotune writes metrics.jsonl (and TensorBoard where configured)",
    "log_level": "evotune logs at INFO",
    "log_processor": "evotune logs every log_interval steps",
    "launcher": "use evotune train --launcher",
    "work_dir": "use evotune train --work-dir",
    "runner_type": "evotune has one training loop",
}
_PART1_TARGETS = {
    # PART 1 names that flow into evotune settings of the same meaning
    "pretrained_model_name_or_path": "pretrained_model_name_or_path",
    "tokenizer_path": "tokenizer_name_or_path",
    "use_varlen_attn": "use_varlen_attn",
    "max_length": "max_length",
    "pack_to_max_length": "pack_to_max_length",
    "batch_size": "batch_size",
    "dataloader_num_workers": "num_workers",
    "accumulative_counts": "accumulative_counts",
    "max_epochs": "max_epochs",
    "lr": "lr",
    "betas": "betas",
    "weight_decay": "weight_decay",
    "max_norm": "max_norm",
    "warm_up_ratio": "warmup_ratio",
    "warmup_ratio": "warmup_ratio",
    "sequence_parallel_size": "sequence_parallel_size",
    "save_steps": "save_steps",
    "save_total_limit": "save_total_limit",
    "evaluation_freq": "evaluation_freq",
    "evaluation_inputs": "evaluation_inputs",
    "SYSTEM": "SYSTEM",
    "prompt_template": "prompt_template",
    "dataset_folder": "dataset_folder",
    "optim_type": "(optimizer)",
    "data_files": "(data tokenize inputs)",
}
_GENERATION_SETTINGS = ("evaluation_freq", "SYSTEM", "evaluation_inputs", "prompt_template")


@dataclass
class _Conversion:
    """Everything the mappers decide, then rendered in one go."""

    source: Path
    output: Path
    mapping: KeyReport
    settings: dict[str, tuple[Any, str]] = field(default_factory=dict)
    dataset_cfg: dict[str, Any] = field(default_factory=dict)
    packing_seed: int = 1024
    sampler: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tokenize_command: str | None = None

    def set(self, name: str, value: Any, source: str) -> None:
        self.settings[name] = (value, source)

    def value(self, name: str, default: Any = None) -> Any:
        return self.settings[name][0] if name in self.settings else default


def convert_xtuner_config(
    source: Path,
    output: Path,
    allow_approximate: bool = False,
    tokenized_dir: Path | None = None,
) -> str:
    """Write the evotune config; returns the printed report (table, notes, data command)."""
    if not source.is_file():
        raise ConversionError(f"{source}: XTuner config not found")
    xtuner = read_xtuner_config(source)
    namespace, failures = xtuner.namespace, xtuner.failures
    if not _looks_like_xtuner(namespace, xtuner.modules):
        raise ConversionError(
            f"{source}: not an XTuner config (no imports from xtuner/mmengine and no "
            "train_dataloader, optim_wrapper or param_scheduler); for an InternEvo config use "
            "'evotune convert internevo-config'"
        )
    for required in ("optim_wrapper", "param_scheduler"):
        if required not in namespace:
            raise ConversionError(
                f"{source}: {required} is missing or unreadable"
                + (f" (could not read: {failures[0]})" if failures else "")
            )
    state = _Conversion(source, output, KeyReport("XTuner", unreadable=failures))
    tokenized = tokenized_dir or output.resolve().parent / f"{output.stem}_tokenized"
    _map_model(state, namespace)
    _map_optimizer(state, namespace)
    _map_train_cfg(state, namespace)
    _map_dataset(state, namespace, tokenized)
    _map_dataloader(state, namespace)
    _map_scheduler(state, namespace)
    _map_hooks(state, namespace)
    _map_runtime(state, namespace)
    state.set("sequence_parallel_size", 1, "XTuner's default (not set)")
    _map_part1(state, xtuner)
    if state.mapping.approximations and not allow_approximate:
        raise ConversionError(
            f"{source}: cannot reproduce exactly: {'; '.join(state.mapping.approximations)}; "
            "pass --allow-approximate to write the config anyway"
        )
    text = _render(state)
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, output)
    report = [state.mapping.table()]
    report += [f"note: {note}" for note in state.notes]
    if state.tokenize_command:
        report.append(f"data: before training, tokenize the data once:\n  {state.tokenize_command}")
    return "\n".join(report)


def _looks_like_xtuner(namespace: dict[str, Any], modules: set[str]) -> bool:
    imports = any(m.split(".")[0] in ("xtuner", "mmengine") for m in modules)
    sections = any(k in namespace for k in ("train_dataloader", "optim_wrapper", "param_scheduler"))
    return imports and sections


# -- model and tokenizer ------------------------------------------------------


def _map_model(state: _Conversion, namespace: dict[str, Any]) -> None:
    m = state.mapping
    model = namespace.get("model")
    if not isinstance(model, dict):
        raise ConversionError(f"{state.source}: model = dict(type=SupervisedFinetune, ...) missing")
    if not _is(model.get("type"), "SupervisedFinetune"):
        m.approximate("model.type", model.get("type"), "evotune fine-tunes a causal LM in full")
    else:
        m.mapped("model.type", model["type"], "(full fine-tuning)")
    llm = model.get("llm")
    if not isinstance(llm, dict):
        raise ConversionError(f"{state.source}: model.llm = dict(type=..., ...) missing")
    for key, value in _items(model):
        if key == "llm":
            continue
        if key == "use_varlen_attn":
            state.set("use_varlen_attn", bool(value), "model.use_varlen_attn")
            m.mapped("model.use_varlen_attn", value, "use_varlen_attn")
        elif key == "use_activation_checkpointing":
            state.set("gradient_checkpointing", bool(value), "model.use_activation_checkpointing")
            m.mapped(f"model.{key}", value, "gradient_checkpointing", "recomputation: same math")
        elif key == "tokenizer":
            m.approximate(
                "model.tokenizer",
                _path_of(value),
                "XTuner grows the embeddings to len(tokenizer) (mean-initialised rows); "
                "resize and save the model first, then train that folder",
            )
        elif key in ("lora", "peft_model") and value is not None:
            m.approximate(f"model.{key}", value, "LoRA: evotune trains every weight")
        elif key == "max_position_embeddings" and value is not None:
            m.approximate(f"model.{key}", value, "XTuner's RoPE scaling is not applied")
        elif value is None or value is False:
            m.ignored(f"model.{key}", value, "off")
        else:
            m.approximate(f"model.{key}", value, "no evotune equivalent")
    if "use_activation_checkpointing" not in model:
        state.set("gradient_checkpointing", True, "SupervisedFinetune default")
        m.mapped(
            "model.use_activation_checkpointing",
            "(default True)",
            "gradient_checkpointing",
            "recomputation: same math",
        )
    if not _is(llm.get("type"), "from_pretrained"):
        m.approximate("model.llm.type", llm.get("type"), "evotune loads with from_pretrained")
    else:
        m.mapped("model.llm.type", llm["type"], "(AutoModelForCausalLM.from_pretrained)")
    for key, value in _items(llm):
        where = f"model.llm.{key}"
        if key == "pretrained_model_name_or_path":
            state.set("pretrained_model_name_or_path", value, where)
            m.mapped(where, value, "pretrained_model_name_or_path")
        elif key == "trust_remote_code":
            m.ignored(
                where,
                value,
                "evotune loads InternLM2 natively (no remote code); other families through "
                "transformers",
            )
        elif key == "torch_dtype":
            m.ignored(where, value, "evotune loads fp32 master weights and computes in dtype")
        elif key == "attn_implementation":
            m.mapped(
                where,
                value,
                "attn_implementation='auto'",
                "flash-attn on CUDA when installed, else SDPA: same math",
            )
        elif key == "quantization_config" and value is not None:
            m.approximate(where, value, "4/8-bit weights: evotune trains full-precision weights")
        else:
            m.approximate(where, value, "a from_pretrained argument evotune does not pass")
    tokenizer = namespace.get("tokenizer")
    if isinstance(tokenizer, dict):
        path = tokenizer.get("pretrained_model_name_or_path")
        model_path = state.value("pretrained_model_name_or_path")
        if path is not None and path != model_path:
            state.set("tokenizer_name_or_path", path, "tokenizer.pretrained_model_name_or_path")
            m.mapped("tokenizer.pretrained_model_name_or_path", path, "tokenizer_name_or_path")
        else:
            m.mapped(
                "tokenizer.pretrained_model_name_or_path",
                path,
                "(the model's folder)",
                "tokenizer saved with checkpoints",
            )
        for key, value in _items(tokenizer):
            if key != "pretrained_model_name_or_path":
                m.ignored(f"tokenizer.{key}", value, "packed rows need no padding or remote code")


def _path_of(spec: Any) -> Any:
    return spec.get("pretrained_model_name_or_path", spec) if isinstance(spec, dict) else spec


# -- optimizer ----------------------------------------------------------------


def _map_optimizer(state: _Conversion, namespace: dict[str, Any]) -> None:
    m = state.mapping
    wrapper = namespace["optim_wrapper"]
    if not isinstance(wrapper, dict):
        raise ConversionError(f"{state.source}: optim_wrapper is not a dict(type=..., ...)")
    kind = _type_name(wrapper.get("type", "OptimWrapper"))
    if kind == "AmpOptimWrapper":
        dtype = _type_name(wrapper.get("dtype")) if wrapper.get("dtype") is not None else None
        if dtype in (None, "bfloat16", "bf16"):
            state.set("dtype", "bfloat16", "optim_wrapper AmpOptimWrapper")
            m.mapped(
                "optim_wrapper.type",
                wrapper["type"],
                "dtype='bfloat16'",
                "bf16 compute over fp32 master weights, as under 'xtuner train --deepspeed' "
                "(its bf16 preset); AmpOptimWrapper without DeepSpeed autocasts in "
                + ("bf16" if dtype else "fp16, which evotune does not have"),
            )
        else:
            state.set("dtype", "bfloat16", "optim_wrapper AmpOptimWrapper")
            m.approximate("optim_wrapper.dtype", wrapper.get("dtype"), "evotune has no fp16")
    elif kind == "OptimWrapper":
        state.set("dtype", "float32", "optim_wrapper OptimWrapper (fp32)")
        m.mapped("optim_wrapper.type", wrapper.get("type"), "dtype='float32'")
    elif kind == "DeepSpeedOptimWrapper":
        state.set("dtype", "bfloat16", "optim_wrapper DeepSpeedOptimWrapper")
        m.mapped("optim_wrapper.type", wrapper["type"], "dtype='bfloat16'", "pass --deepspeed")
    else:
        state.set("dtype", "bfloat16", "optim_wrapper")
        m.approximate("optim_wrapper.type", wrapper.get("type"), "unknown optimizer wrapper")
    optimizer = wrapper.get("optimizer")
    if not isinstance(optimizer, dict):
        raise ConversionError(f"{state.source}: optim_wrapper.optimizer = dict(type=...) missing")
    if _is(optimizer.get("type"), "AdamW"):
        m.mapped("optim_wrapper.optimizer.type", optimizer["type"], "(AdamW)")
    else:
        m.approximate(
            "optim_wrapper.optimizer.type", optimizer.get("type"), "evotune optimizes with AdamW"
        )
    state.set("eps", 1e-8, "torch AdamW default eps")
    state.set("weight_decay", 0.01, "torch AdamW default weight_decay")
    for key, value in _items(optimizer):
        where = f"optim_wrapper.optimizer.{key}"
        if key in ("lr", "eps", "weight_decay"):
            state.set(key, float(value), where)
            m.mapped(where, value, key)
        elif key == "betas":
            state.set("betas", (float(value[0]), float(value[1])), where)
            m.mapped(where, value, "betas")
        elif key in ("foreach", "fused", "capturable", "differentiable") or (
            key in ("amsgrad", "maximize") and not value
        ):
            m.ignored(where, value, "implementation detail (same math)")
        else:
            m.approximate(where, value, "an AdamW option evotune does not set")
    if "lr" not in optimizer:
        raise ConversionError(f"{state.source}: optim_wrapper.optimizer.lr is missing")
    state.set("weight_decay_scope", "all", "torch AdamW over all parameters (no paramwise_cfg)")
    clip = wrapper.get("clip_grad")
    if clip is None:
        state.set("max_norm", 0.0, "optim_wrapper.clip_grad=None")
        m.mapped("optim_wrapper.clip_grad", None, "max_norm=0", "no clipping")
    else:
        state.set("max_norm", float(clip.get("max_norm")), "optim_wrapper.clip_grad.max_norm")
        m.mapped("optim_wrapper.clip_grad.max_norm", clip.get("max_norm"), "max_norm")
        for key, value in clip.items():
            if key == "max_norm":
                continue
            if key == "error_if_nonfinite" and not value:
                m.ignored(f"optim_wrapper.clip_grad.{key}", value, "evotune skips non-finite steps")
            elif key == "norm_type" and float(value) == 2.0:
                m.mapped(f"optim_wrapper.clip_grad.{key}", value, "(L2 norm)")
            else:
                m.approximate(f"optim_wrapper.clip_grad.{key}", value, "evotune clips the L2 norm")
    counts = int(wrapper.get("accumulative_counts", 1))
    state.set("accumulative_counts", counts, "optim_wrapper.accumulative_counts")
    m.mapped("optim_wrapper.accumulative_counts", counts, "accumulative_counts")
    for key, value in _items(wrapper):
        if key in ("optimizer", "clip_grad", "accumulative_counts", "dtype"):
            continue
        if key == "loss_scale":
            m.ignored(f"optim_wrapper.{key}", value, "loss scaling is for fp16; bf16 needs none")
        elif key == "paramwise_cfg" and value:
            m.approximate(f"optim_wrapper.{key}", value, "per-parameter LR/decay not supported")
        else:
            m.approximate(f"optim_wrapper.{key}", value, "no evotune equivalent")


# -- length of training -------------------------------------------------------


def _map_train_cfg(state: _Conversion, namespace: dict[str, Any]) -> None:
    m = state.mapping
    train_cfg = namespace.get("train_cfg")
    if not isinstance(train_cfg, dict) or "max_epochs" not in train_cfg:
        if isinstance(train_cfg, dict) and "max_iters" in train_cfg:
            m.approximate(
                "train_cfg.max_iters",
                train_cfg["max_iters"],
                "evotune's XTuner schedule counts epochs; set max_epochs",
            )
            state.set("max_epochs", 1, "train_cfg")
            return
        raise ConversionError(f"{state.source}: train_cfg = dict(max_epochs=...) is missing")
    state.set("max_epochs", int(train_cfg["max_epochs"]), "train_cfg.max_epochs")
    m.mapped("train_cfg.max_epochs", train_cfg["max_epochs"], "max_epochs")
    for key, value in _items(train_cfg):
        if key == "max_epochs":
            continue
        if key in ("val_interval", "val_begin"):
            m.ignored(f"train_cfg.{key}", value, "no validation loop configured")
        else:
            m.approximate(f"train_cfg.{key}", value, "no evotune equivalent")
    if "type" in train_cfg:
        m.ignored("train_cfg.type", train_cfg["type"], "evotune has one training loop")


# -- data ---------------------------------------------------------------------


def _template_name(value: Any, where: str, source: Path) -> str:
    if isinstance(value, dict) and _is(value.get("type"), "template_map_fn_factory"):
        value = value.get("template")
    if isinstance(value, Symbol) and ".PROMPT_TEMPLATE." in f".{value.path}":
        return value.name
    if isinstance(value, str):
        return value.rsplit(".", 1)[-1]
    raise ConversionError(
        f"{source}: {where} = {value!r}: evotune reads XTuner's named templates "
        "(PROMPT_TEMPLATE.<name>) only; add yours to the data as conversation text"
    )


def _map_dataset(state: _Conversion, namespace: dict[str, Any], tokenized: Path) -> None:
    dataset = namespace.get("train_dataset")
    loader = namespace.get("train_dataloader")
    if dataset is None and isinstance(loader, dict):
        dataset = loader.get("dataset")
    if not isinstance(dataset, dict):
        raise ConversionError(f"{state.source}: train_dataset = dict(type=...) is missing")
    kind = _type_name(dataset.get("type"))
    state.set("pack_to_max_length", True, "always packed")
    if kind == "build_packed_dataset":
        _map_packed(state, dataset, tokenized)
    elif kind == "process_hf_dataset":
        _map_hf_dataset(state, dataset, tokenized)
    else:
        raise ConversionError(
            f"{state.source}: train_dataset.type = {dataset.get('type')!r}: a dataset evotune "
            "cannot read; it reads build_packed_dataset (tokenized or untokenized InternEvo "
            "folders) and process_hf_dataset over JSON files"
        )
    state.notes.append(
        "packs as XTuner builds them (pack_mode='xtuner': labels shifted over the whole pack, "
        "a fragment's last token targets the next one's first); InternEvo shifts inside each "
        "sample (pack_mode='internevo')"
    )


def _map_packed(state: _Conversion, dataset: dict[str, Any], tokenized: Path) -> None:
    m = state.mapping
    cfg = dataset.get("dataset_cfg")
    if not isinstance(cfg, dict):
        raise ConversionError(f"{state.source}: train_dataset.dataset_cfg = dict(type=...) missing")
    kind = _type_name(cfg.get("type"))
    m.mapped("train_dataset.type", dataset["type"], "build_packed_dataset(pack_mode='xtuner')")
    packed = dataset.get("packed_length", 8192)
    state.set("max_length", int(packed), "train_dataset.packed_length")
    m.mapped("train_dataset.packed_length", packed, "max_length")
    state.packing_seed = int(dataset.get("seed", 1024))
    m.mapped("train_dataset.seed", state.packing_seed, "train_dataset.seed", "per-file shuffle")
    for key, value in _items(dataset):
        if key not in ("dataset_cfg", "packed_length", "seed"):
            m.approximate(f"train_dataset.{key}", value, "no build_packed_dataset argument")
    if kind == "load_intern_repo_tokenized_dataset":
        m.mapped(
            "train_dataset.dataset_cfg.type", cfg["type"], "load_intern_repo_tokenized_dataset"
        )
        folder = cfg.get("folder")
        if folder is None:
            raise ConversionError(f"{state.source}: train_dataset.dataset_cfg.folder is missing")
        state.set("dataset_folder", str(folder), "train_dataset.dataset_cfg.folder")
        m.mapped("train_dataset.dataset_cfg.folder", folder, "dataset_folder")
        state.dataset_cfg = {
            "min_length": int(cfg.get("min_length", 0)),
            "data_order_path": cfg.get("data_order_path"),
            "file_type": cfg.get("file_type", ".bin"),
        }
        for key in ("min_length", "data_order_path", "file_type"):
            if key in cfg:
                m.mapped(f"train_dataset.dataset_cfg.{key}", cfg[key], f"dataset_cfg.{key}")
        for key, value in _items(cfg):
            if key not in ("folder", "min_length", "data_order_path", "file_type"):
                m.approximate(f"train_dataset.dataset_cfg.{key}", value, "unknown argument")
        if cfg.get("data_order_path") is None:
            state.notes.append(
                "file order: XTuner walks directories in filesystem order; evotune sorts the "
                "whole relative path (docs/data-format.md). Pass data_order_path to pin an order"
            )
    elif kind == "load_intern_repo_untokenized_dataset":
        m.mapped(
            "train_dataset.dataset_cfg.type",
            cfg["type"],
            "(tokenized once by 'evotune data tokenize --format internevo-untokenized')",
        )
        if cfg.get("processed_dataset_dict_path") is not None:
            raise ConversionError(
                f"{state.source}: train_dataset.dataset_cfg.processed_dataset_dict_path: a "
                "saved HF DatasetDict evotune cannot read; point folder= at the .json files"
            )
        folder = cfg.get("folder")
        if folder is None:
            raise ConversionError(f"{state.source}: train_dataset.dataset_cfg.folder is missing")
        template = _template_name(
            cfg.get("template_map_fn"), "train_dataset.dataset_cfg.template_map_fn", state.source
        )
        length = cfg.get("max_length")
        file_type = cfg.get("file_type", ".json")
        m.mapped("train_dataset.dataset_cfg.folder", folder, "(data tokenize input)")
        m.mapped("train_dataset.dataset_cfg.template_map_fn", template, "--prompt-template")
        m.mapped("train_dataset.dataset_cfg.max_length", length, "--max-length")
        m.mapped("train_dataset.dataset_cfg.file_type", file_type, "--file-type")
        if "tokenizer" in cfg:
            m.mapped(
                "train_dataset.dataset_cfg.tokenizer", _path_of(cfg["tokenizer"]), "--tokenizer"
            )
        for key, value in _items(cfg):
            known = ("folder", "tokenizer", "max_length", "template_map_fn", "file_type")
            if key in (*known, "processed_dataset_dict_path"):
                continue
            if key == "data_order_path" and value is not None:
                m.approximate(
                    f"train_dataset.dataset_cfg.{key}",
                    value,
                    "its .json names do not match the tokenized .bin shards; write a new one "
                    "with 'evotune data order'",
                )
            elif key == "data_order_path":
                m.ignored(f"train_dataset.dataset_cfg.{key}", value, "none")
            else:
                m.approximate(f"train_dataset.dataset_cfg.{key}", value, "unknown argument")
        state.set("dataset_folder", str(tokenized), "tokenized from " + str(folder))
        state.dataset_cfg = {"min_length": 0, "data_order_path": None, "file_type": ".bin"}
        tokenizer = _path_of(cfg.get("tokenizer")) or state.value("pretrained_model_name_or_path")
        state.tokenize_command = _command(
            [str(folder)],
            tokenized,
            tokenizer,
            ["--format", "internevo-untokenized", "--prompt-template", template]
            + (["--max-length", str(length)] if length is not None else [])
            + (["--file-type", str(file_type)] if file_type != ".json" else []),
        )
    else:
        raise ConversionError(
            f"{state.source}: train_dataset.dataset_cfg.type = {cfg.get('type')!r}: a dataset "
            "evotune cannot read (load_intern_repo_tokenized_dataset and "
            "load_intern_repo_untokenized_dataset are)"
        )


def _map_hf_dataset(state: _Conversion, dataset: dict[str, Any], tokenized: Path) -> None:
    m = state.mapping
    inner = dataset.get("dataset")
    if not (
        isinstance(inner, dict)
        and _is(inner.get("type"), "load_dataset")
        and inner.get("path") == "json"
        and inner.get("data_files")
    ):
        raise ConversionError(
            f"{state.source}: train_dataset.dataset = {inner!r}: evotune reads "
            "load_dataset(path='json', data_files=[...]) only; save the data as JSON files"
        )
    files = inner["data_files"]
    files = [files] if isinstance(files, str) else files
    if isinstance(files, dict) or not all(isinstance(f, str) for f in files):
        raise ConversionError(
            f"{state.source}: train_dataset.dataset.data_files = {files!r}: give a list of paths"
        )
    m.mapped("train_dataset.type", dataset["type"], "build_packed_dataset(pack_mode='xtuner')")
    m.mapped("train_dataset.dataset.data_files", files, "(data tokenize inputs)")
    map_fn = dataset.get("dataset_map_fn")
    if map_fn is not None and not _is(map_fn, "openai_map_fn"):
        raise ConversionError(
            f"{state.source}: train_dataset.dataset_map_fn = {map_fn!r}: evotune reads XTuner's "
            "conversation format (dataset_map_fn=None) and openai_map_fn messages only"
        )
    m.mapped("train_dataset.dataset_map_fn", map_fn, "--format xtuner", "conversation or messages")
    template = (
        _template_name(dataset["template_map_fn"], "train_dataset.template_map_fn", state.source)
        if dataset.get("template_map_fn") is not None
        else "none"
    )
    m.mapped("train_dataset.template_map_fn", template, "--prompt-template")
    length = dataset.get("max_length")
    if length is None:
        raise ConversionError(f"{state.source}: train_dataset.max_length is missing")
    state.set("max_length", int(length), "train_dataset.max_length")
    m.mapped("train_dataset.max_length", length, "max_length, --max-length")
    if "tokenizer" in dataset:
        m.mapped("train_dataset.tokenizer", _path_of(dataset["tokenizer"]), "--tokenizer")
    for key, value in _items(dataset):
        where = f"train_dataset.{key}"
        if key in ("dataset", "dataset_map_fn", "template_map_fn", "max_length", "tokenizer"):
            continue
        if key == "use_varlen_attn":
            m.mapped(where, value, "use_varlen_attn")
        elif key == "pack_to_max_length" and value:
            m.mapped(where, value, "pack_to_max_length")
        elif key == "shuffle_before_pack" and value:
            m.mapped(
                where,
                value,
                "(per-file shuffle, seed 1024)",
                "XTuner's shuffle is unseeded: its packs are not reproducible",
            )
        elif key in ("remove_unused_columns", "map_num_proc", "split"):
            m.ignored(where, value, "no effect on the tokens")
        elif (key == "max_dataset_length" and value is None) or (
            key in ("rename_maps",) and not value
        ):
            m.ignored(where, value, "none")
        elif key == "input_ids_with_output" and value:
            m.ignored(where, value, "outputs are always part of training samples")
        elif key == "with_image_token" and not value:
            m.ignored(where, value, "text only")
        elif key == "do_dataset_tokenization" and value:
            m.ignored(where, value, "evotune tokenizes with 'data tokenize'")
        else:
            m.approximate(where, value, "changes which tokens are trained; not supported")
    state.set("dataset_folder", str(tokenized), "tokenized from train_dataset.dataset.data_files")
    state.dataset_cfg = {"min_length": 0, "data_order_path": None, "file_type": ".bin"}
    state.notes.append(
        "process_hf_dataset packs the whole dataset as one stream and keeps a short last pack; "
        "evotune packs each tokenized file on its own (seed 1024) and drops the tail shorter "
        "than max_length"
    )
    tokenizer = _path_of(dataset.get("tokenizer")) or state.value("pretrained_model_name_or_path")
    state.tokenize_command = _command(
        files,
        tokenized,
        tokenizer,
        ["--format", "xtuner", "--prompt-template", template, "--max-length", str(length)],
    )


def _command(inputs: list[str], output: Path, tokenizer: Any, options: list[str]) -> str:
    words = ["evotune", "data", "tokenize", *inputs, "-o", str(output)]
    words += ["--tokenizer", str(tokenizer), *options]
    return " ".join(shlex.quote(word) for word in words)


def _map_dataloader(state: _Conversion, namespace: dict[str, Any]) -> None:
    m = state.mapping
    loader = namespace.get("train_dataloader")
    if not isinstance(loader, dict):
        raise ConversionError(f"{state.source}: train_dataloader = dict(...) is missing")
    batch = int(loader.get("batch_size", 1))
    state.set("batch_size", batch, "train_dataloader.batch_size")
    m.mapped("train_dataloader.batch_size", batch, "batch_size", "packs per micro-batch")
    workers = int(loader.get("num_workers", 0))
    state.set("num_workers", workers, "train_dataloader.num_workers")
    m.mapped("train_dataloader.num_workers", workers, "num_workers")
    sampler = loader.get("sampler")
    if not isinstance(sampler, dict):
        raise ConversionError(f"{state.source}: train_dataloader.sampler = dict(type=...) missing")
    kind = _type_name(sampler.get("type"))
    shuffle = bool(sampler.get("shuffle", True))
    seed = sampler.get("seed")
    if kind in ("InternRepoSampler", "InternlmRepoSampler"):
        state.sampler = {"type": "InternRepoSampler", "shuffle": shuffle, "seed": 1024}
        state.sampler["order"] = "xtuner"
        m.mapped(
            "train_dataloader.sampler.type", sampler["type"], "InternRepoSampler(order='xtuner')"
        )
        m.mapped(
            "train_dataloader.sampler.seed",
            seed,
            "sampler seed 1024",
            "XTuner forces 1024 whatever is given" if seed not in (None, 1024) else "",
        )
    elif kind in ("SequenceParallelSampler", "DefaultSampler"):
        if seed is None:
            m.ignored(
                "train_dataloader.sampler.seed",
                None,
                "XTuner draws a random seed per run, so no order is to be kept; evotune uses 0",
            )
            seed = 0
        else:
            m.mapped("train_dataloader.sampler.seed", seed, "sampler seed")
        state.sampler = {
            "type": "SequenceParallelSampler",
            "shuffle": shuffle,
            "seed": int(seed),
            "round_up": bool(sampler.get("round_up", True)),
        }
        m.mapped(
            "train_dataloader.sampler.type",
            sampler["type"],
            "SequenceParallelSampler",
            "torch.randperm(seed + epoch) over data-parallel ranks"
            + (
                "; DefaultSampler splits over all ranks (same at sp=1)"
                if kind == "DefaultSampler"
                else ""
            ),
        )
    else:
        raise ConversionError(
            f"{state.source}: train_dataloader.sampler.type = {sampler.get('type')!r}: a sampler "
            "evotune cannot reproduce (InternRepoSampler, SequenceParallelSampler, DefaultSampler)"
        )
    m.mapped("train_dataloader.sampler.shuffle", shuffle, "sampler shuffle")
    for key, value in _items(sampler):
        if key not in ("shuffle", "seed", "round_up"):
            m.approximate(f"train_dataloader.sampler.{key}", value, "unknown sampler argument")
    batch_sampler = loader.get("batch_sampler")
    if isinstance(batch_sampler, dict):
        if batch_sampler.get("drop_last", False) or batch == 1:
            m.ignored(
                "train_dataloader.batch_sampler",
                batch_sampler.get("type"),
                "evotune takes batch_size packs per micro-batch and drops an incomplete one",
            )
        else:
            m.approximate(
                "train_dataloader.batch_sampler.drop_last", False, "evotune drops the last batch"
            )
        if int(batch_sampler.get("batch_size", batch)) != batch:
            m.approximate(
                "train_dataloader.batch_sampler.batch_size",
                batch_sampler.get("batch_size"),
                f"differs from batch_size={batch}",
            )
    collate = loader.get("collate_fn")
    if isinstance(collate, dict):
        if _is(collate.get("type"), "default_collate_fn"):
            m.ignored(
                "train_dataloader.collate_fn",
                collate.get("type"),
                "evotune's collator: one varlen row per micro-batch",
            )
        else:
            m.approximate("train_dataloader.collate_fn", collate.get("type"), "unknown collate_fn")
    for key, value in _items(loader):
        if key in ("batch_size", "num_workers", "sampler", "batch_sampler", "collate_fn"):
            continue
        if key == "dataset":
            m.ignored("train_dataloader.dataset", "train_dataset", "train_dataset")
        elif key in ("persistent_workers", "pin_memory", "prefetch_factor"):
            m.ignored(f"train_dataloader.{key}", value, "loader performance only")
        else:
            m.approximate(f"train_dataloader.{key}", value, "unknown dataloader argument")


# -- learning-rate schedule ---------------------------------------------------


def _map_scheduler(state: _Conversion, namespace: dict[str, Any]) -> None:
    m = state.mapping
    schedulers = namespace["param_scheduler"]
    schedulers = [schedulers] if isinstance(schedulers, dict) else list(schedulers)
    linear = cosine = None
    for index, scheduler in enumerate(schedulers):
        kind = _type_name(scheduler.get("type") if isinstance(scheduler, dict) else scheduler)
        if kind == "LinearLR" and linear is None and cosine is None:
            linear = (index, scheduler)
        elif kind == "CosineAnnealingLR" and cosine is None:
            cosine = (index, scheduler)
        else:
            raise ConversionError(
                f"{state.source}: param_scheduler[{index}].type = {kind!r}: unknown scheduler "
                "type; evotune reproduces LinearLR (warm-up) followed by CosineAnnealingLR"
            )
    epochs = state.value("max_epochs", 1)
    lr = state.value("lr")
    warmup_end: float = 0.0
    start_factor = XTUNER_START_FACTOR
    if linear is not None:
        index, spec = linear
        where = f"param_scheduler[{index}]"
        _check_epoch_based(state, where, spec)
        start_factor = float(spec.get("start_factor", 1.0 / 3))
        if float(spec.get("end_factor", 1.0)) != 1.0:
            m.approximate(f"{where}.end_factor", spec["end_factor"], "the warm-up must end at lr")
        if float(spec.get("begin", 0)) != 0:
            m.approximate(f"{where}.begin", spec["begin"], "the warm-up must start at step 0")
        warmup_end = float(spec.get("end", INF))
        m.mapped(f"{where}.type", spec["type"], "lr_schedule='xtuner'", "mmengine LinearLR")
        m.mapped(f"{where}.start_factor", spec.get("start_factor"), "warmup_start_factor")
        m.mapped(f"{where}.end", spec.get("end"), "warmup_ratio", f"epochs of max_epochs={epochs}")
        _unknown_keys(state, where, spec, ("start_factor", "end_factor", "begin", "end"))
    if cosine is not None:
        index, spec = cosine
        where = f"param_scheduler[{index}]"
        _check_epoch_based(state, where, spec)
        begin, end = float(spec.get("begin", 0)), spec.get("end", INF)
        if begin != warmup_end:
            m.approximate(
                f"{where}.begin",
                begin,
                f"the cosine must begin where the warm-up ends ({warmup_end})",
            )
        if end == INF or float(end) != float(epochs):
            m.approximate(f"{where}.end", end, f"the cosine must end at max_epochs={epochs}")
        if spec.get("T_max") is not None and float(spec["T_max"]) != float(end) - begin:
            m.approximate(f"{where}.T_max", spec["T_max"], "T_max must be end - begin")
        if spec.get("eta_min_ratio") is not None:
            eta_min = lr * float(spec["eta_min_ratio"])
            m.mapped(f"{where}.eta_min_ratio", spec["eta_min_ratio"], "eta_min", "lr * ratio")
        else:
            eta_min = float(spec.get("eta_min") or 0.0)
            m.mapped(f"{where}.eta_min", spec.get("eta_min"), "eta_min")
        m.mapped(
            f"{where}.type", spec["type"], "lr_schedule='xtuner'", "mmengine CosineAnnealingLR"
        )
        m.mapped(f"{where}.begin/end", (spec.get("begin"), end), "(warm-up end .. max_epochs)")
        _unknown_keys(state, where, spec, ("eta_min", "eta_min_ratio", "begin", "end", "T_max"))
    else:
        eta_min = lr  # a warm-up alone: the LR stays at lr afterwards
        state.notes.append("no CosineAnnealingLR: the LR stays at lr after the warm-up")
    if linear is None:
        warmup_end, start_factor = 0.0, 1.0
    if warmup_end >= epochs:
        state.mapping.approximate(
            "param_scheduler LinearLR.end", warmup_end, f"the warm-up outlasts max_epochs={epochs}"
        )
        warmup_end = 0.0
    candidates = [namespace.get(n) for n in ("warm_up_ratio", "warmup_ratio")]
    ratio = next(
        (float(c) for c in candidates if isinstance(c, int | float) and c * epochs == warmup_end),
        None,
    )
    if ratio is None:
        ratio = _ratio_of(warmup_end, epochs)
    state.set("lr_schedule", "xtuner", "param_scheduler: LinearLR + CosineAnnealingLR")
    state.set("warmup_ratio", ratio, f"LinearLR end = {warmup_end!r} epochs of {epochs}")
    state.set("warmup_start_factor", start_factor, "LinearLR start_factor")
    state.set("eta_min", eta_min, "CosineAnnealingLR eta_min")
    state.set(
        "lr_step_unit",
        "micro_batch",
        "ParamSchedulerHook steps the LR every iteration (micro-batch)",
    )
    state.set("loss_reduction", "pack", "token mean per micro-batch, averaged over accumulation")


def _check_epoch_based(state: _Conversion, where: str, spec: dict[str, Any]) -> None:
    by_epoch = spec.get("by_epoch", True)
    convert = spec.get("convert_to_iter_based", False)
    if by_epoch and convert:
        state.mapping.mapped(
            f"{where}.by_epoch/convert_to_iter_based",
            (by_epoch, convert),
            "lr_step_unit='micro_batch'",
            "lengths int(epochs * iterations per epoch)",
        )
    else:
        state.mapping.approximate(
            f"{where}.by_epoch/convert_to_iter_based",
            (by_epoch, convert),
            "evotune reproduces epoch-based schedules converted to iterations only",
        )


def _unknown_keys(
    state: _Conversion, where: str, spec: dict[str, Any], known: tuple[str, ...]
) -> None:
    for key, value in _items(spec):
        if key in (*known, "by_epoch", "convert_to_iter_based"):
            continue
        if key == "verbose":
            state.mapping.ignored(f"{where}.{key}", value, "logging only")
        else:
            state.mapping.approximate(f"{where}.{key}", value, "unknown scheduler argument")


def _ratio_of(end: float, epochs: int) -> float:
    """The warmup_ratio r with r * epochs == end exactly (so int(r * epochs * L) is XTuner's)."""
    if end == 0.0:
        return 0.0
    ratio = end / epochs
    for _ in range(8):
        product = ratio * epochs
        if product == end:
            return ratio
        ratio = math.nextafter(ratio, math.inf if product < end else -math.inf)
    raise ConversionError(f"LinearLR end={end!r} is not a float multiple of max_epochs={epochs}")


# -- hooks and runtime --------------------------------------------------------


def _map_hooks(state: _Conversion, namespace: dict[str, Any]) -> None:
    m = state.mapping
    counts = state.value("accumulative_counts", 1)
    for index, hook in enumerate(namespace.get("custom_hooks") or []):
        where = f"custom_hooks[{index}]"
        kind = _type_name(hook.get("type") if isinstance(hook, dict) else hook)
        if kind == "EvaluateChatHook" and isinstance(hook, dict):
            inputs = hook.get("evaluation_inputs", [])
            every = hook.get("every_n_iters")
            state.set("evaluation_inputs", list(inputs), f"{where}.evaluation_inputs")
            state.set("SYSTEM", hook.get("system", ""), f"{where}.system")
            template = hook.get("prompt_template")
            if template is not None:
                state.set(
                    "prompt_template",
                    _template_name(template, f"{where}.prompt_template", state.source),
                    f"{where}.prompt_template",
                )
            m.mapped(f"{where}.evaluation_inputs", inputs, "evaluation_inputs")
            m.mapped(f"{where}.system", hook.get("system"), "SYSTEM")
            m.mapped(f"{where}.prompt_template", template, "prompt_template")
            if every is not None:
                steps = max(1, int(every) // counts)
                state.set("evaluation_freq", steps, f"{where}.every_n_iters // accumulative_counts")
                m.mapped(
                    f"{where}.every_n_iters",
                    every,
                    "evaluation_freq",
                    f"iterations / {counts} = {steps} optimizer steps",
                )
            for key, value in _items(hook):
                if key in ("tokenizer", "every_n_iters", "evaluation_inputs", "system"):
                    continue
                if key != "prompt_template":
                    m.ignored(f"{where}.{key}", value, "generation detail")
        elif kind == "DatasetInfoHook":
            m.ignored(where, kind, "built in: evotune prints the dataset at start")
        elif kind == "ThroughputHook":
            m.ignored(where, kind, "built in: tokens/s, TFLOPs and MFU in every metrics record")
        elif kind == "VarlenAttnArgsToMessageHubHook":
            m.ignored(
                where,
                kind,
                "not needed: evotune hands cu_seqlens to attention as a forward argument, "
                "with no message hub",
            )
        else:
            m.approximate(where, kind, "a hook evotune does not have")
    for name, hook in (namespace.get("default_hooks") or {}).items():
        where = f"default_hooks.{name}"
        kind = _type_name(hook.get("type") if isinstance(hook, dict) else hook)
        if kind == "CheckpointHook" and isinstance(hook, dict):
            interval = hook.get("interval", 1)
            if hook.get("by_epoch", True):
                m.ignored(f"{where}.by_epoch", True, "evotune saves every save_steps steps")
            else:
                steps = max(1, int(interval) // counts)
                state.set("save_steps", steps, f"{where}.interval // accumulative_counts")
                m.mapped(
                    f"{where}.interval",
                    interval,
                    "save_steps",
                    f"iterations / {counts} = {steps} optimizer steps",
                )
            keep = hook.get("max_keep_ckpts", -1)
            state.set(
                "save_total_limit",
                int(keep) if keep and keep > 0 else -1,
                f"{where}.max_keep_ckpts",
            )
            m.mapped(f"{where}.max_keep_ckpts", keep, "save_total_limit")
            for key, value in _items(hook):
                if key not in ("interval", "max_keep_ckpts", "by_epoch"):
                    m.ignored(f"{where}.{key}", value, "evotune saves model, optimizer and state")
        elif kind == "LoggerHook" and isinstance(hook, dict):
            interval = int(hook.get("interval", 10))
            state.set("log_interval", interval, f"{where}.interval")
            m.mapped(f"{where}.interval", interval, "log_interval")
        elif kind == "IterTimerHook":
            m.ignored(where, kind, "built in: every step is timed")
        elif kind == "ParamSchedulerHook":
            m.ignored(where, kind, "built in: lr_step_unit='micro_batch' steps as this hook does")
        elif kind == "DistSamplerSeedHook":
            m.ignored(where, kind, "built in: the sampler gets the epoch")
        else:
            m.ignored(where, kind, "no effect on training")


def _map_runtime(state: _Conversion, namespace: dict[str, Any]) -> None:
    m = state.mapping
    randomness = namespace.get("randomness") or {}
    seed = randomness.get("seed") if isinstance(randomness, dict) else None
    if seed is None:
        state.set("seed", 0, "randomness.seed=None (XTuner: a random seed per run)")
        m.ignored("randomness.seed", None, "XTuner draws a random seed; evotune uses 0")
    else:
        state.set("seed", int(seed), "randomness.seed")
        m.mapped("randomness.seed", seed, "seed")
    if isinstance(randomness, dict) and randomness.get("deterministic"):
        m.ignored("randomness.deterministic", True, "evotune does not switch cuDNN determinism")
    for key, reason in _SILENT_RUNNER_KEYS.items():
        if key in namespace:
            m.ignored(key, namespace[key], reason)
    if namespace.get("load_from"):
        m.approximate(
            "load_from",
            namespace["load_from"],
            "convert that checkpoint to an HF folder and set pretrained_model_name_or_path",
        )
    elif "load_from" in namespace:
        m.ignored("load_from", None, "none")
    if "resume" in namespace:
        m.ignored("resume", namespace["resume"], "use evotune train --resume auto")
    if "strategy" in namespace:
        m.ignored("strategy", namespace["strategy"], "pass --deepspeed to evotune train")


def _map_part1(state: _Conversion, xtuner: XTunerFile) -> None:
    """Rows for the plain settings of PART 1, checked against what the components used."""
    m = state.mapping
    for name, value in xtuner.namespace.items():
        if name in xtuner.imported_names or name in _RUNNER_KEYS:
            continue
        target = _PART1_TARGETS.get(name)
        shown = _type_name(value) if target == "prompt_template" else value
        if name == "sequence_parallel_size":
            state.set("sequence_parallel_size", int(value), "sequence_parallel_size")
            m.mapped(name, value, "sequence_parallel_size", _sp_note(int(value)))
        elif target is None:
            m.ignored(name, value, "a helper name no XTuner component reads by this name")
        elif target.startswith("("):
            m.mapped(name, value, target, "used through the components")
        elif target == "dataset_folder" and state.tokenize_command:
            m.mapped(name, value, "(data tokenize input)", "see the tokenize command")
        elif target in state.settings:
            used, source = state.settings[target]
            if used == shown:
                m.mapped(name, value, target, f"as {source}")
            else:
                m.ignored(name, value, f"XTuner used {source} = {used!r}; evotune keeps that")
        elif target in _GENERATION_SETTINGS:
            state.set(target, shown, f"PART 1 {name}")
            m.mapped(name, value, target)
        else:
            m.ignored(name, value, "not read by the XTuner components in this file")


def _sp_note(sp: int) -> str:
    if sp == 1:
        return ""
    return (
        "evotune's Ulysses loss is the exact loss of the whole pack; XTuner averaged per-shard "
        "means and lost sp-1 targets per row"
    )


# ---------------------------------------------------------------------------
# the evotune config


_PARTS: list[tuple[str, list[tuple[str, list[str]]]]] = [
    (
        "PART 1  Settings",
        [
            (
                "Model",
                ["pretrained_model_name_or_path", "tokenizer_name_or_path", "use_varlen_attn"],
            ),
            ("Data", ["dataset_folder", "max_length", "pack_to_max_length"]),
            ("Parallel", ["sequence_parallel_size"]),
            (
                "Scheduler & Optimizer",
                [
                    "batch_size",
                    "accumulative_counts",
                    "num_workers",
                    "max_epochs",
                    "lr",
                    "betas",
                    "eps",
                    "weight_decay",
                    "max_norm",
                    "warmup_ratio",
                ],
            ),
            ("Save", ["save_steps", "save_total_limit"]),
            (
                "Evaluate the generation performance during the training",
                list(_GENERATION_SETTINGS),
            ),
        ],
    ),
    ("PART 2  Model & Tokenizer", [("", ["dtype", "gradient_checkpointing"])]),
    ("PART 3  Dataset & Dataloader", []),
    (
        "PART 4  Scheduler & Optimizer",
        [
            (
                "",
                [
                    "lr_schedule",
                    "warmup_start_factor",
                    "eta_min",
                    "lr_step_unit",
                    "weight_decay_scope",
                    "loss_reduction",
                ],
            )
        ],
    ),
    ("PART 5  Runtime", [("", ["log_interval", "seed"])]),
]


def _banner(title: str) -> list[str]:
    return ["", "#" * 71, "#" + title.center(69) + "#", "#" * 71]


def _render(state: _Conversion) -> str:
    approximations = state.mapping.approximations
    lines = [
        f"# evotune config converted from the XTuner config {state.source.name}",
        "# by 'evotune convert xtuner-config'. Settings not reproduced:",
        *([f"#   {a}" for a in approximations] or ["#   none"]),
    ]
    if state.tokenize_command:
        lines += ["# Tokenize the data once before training:", f"#   {state.tokenize_command}"]
    sampler_type = state.sampler["type"]
    lines.append(
        f"from evotune.data import {sampler_type}, build_packed_dataset, "
        "load_intern_repo_tokenized_dataset"
    )
    written: set[str] = set()
    for title, groups in _PARTS:
        lines += _banner(title)
        if title.startswith("PART 3"):
            lines += _dataset_lines(state)
            continue
        for heading, names in groups:
            present = [n for n in names if n in state.settings]
            if not present:
                continue
            if heading:
                lines.append(f"# {heading}")
            for name in present:
                value, source = state.settings[name]
                lines.append(f"{name} = {value!r}  # XTuner: {source}")
                written.add(name)
    leftover = [n for n in state.settings if n not in written]
    assert not leftover, f"settings without a place in the layout: {leftover}"
    return "\n".join(lines) + "\n"


def _dataset_lines(state: _Conversion) -> list[str]:
    cfg = state.dataset_cfg
    sampler = ", ".join(f"{k}={v!r}" for k, v in state.sampler.items() if k != "type")
    return [
        "train_dataset = dict(",
        "    type=build_packed_dataset,",
        "    dataset_cfg=dict(",
        "        type=load_intern_repo_tokenized_dataset,",
        "        folder=dataset_folder,",
        f"        min_length={cfg['min_length']!r},",
        f"        data_order_path={cfg['data_order_path']!r},",
        f"        file_type={cfg['file_type']!r},",
        "    ),",
        "    packed_length=max_length,",
        f"    seed={state.packing_seed!r},",
        "    pack_mode='xtuner',  # XTuner's packs and labels",
        ")",
        "",
        "train_dataloader = dict(",
        f"    sampler=dict(type={state.sampler['type']}, {sampler}),",
        ")",
    ]
