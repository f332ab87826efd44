"""Hugging Face `llama` and `qwen3` checkpoints: which configs they read, config.json ↔ blueprint, and the
tensor-name map HF ↔ hyloom.

Both are the same plain decoder (RMSNorm → GQA attention with RoPE → RMSNorm → SwiGLU); Qwen3 adds a
per-head RMSNorm on q and k. Anything else a config asks for is refused with the field named, because
loading the weights anyway would give a model that runs but computes something different.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from hyloom.blueprint import Problem
from hyloom.checkpoint import CheckpointError

# HF name ↔ our name; `{n}` is the layer index.
SHARED_KEYS = (
    ("model.embed_tokens.weight", "embed_tokens.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{n}.input_layernorm.weight", "layers.{n}.mixer_norm.weight"),
    ("model.layers.{n}.self_attn.q_proj.weight", "layers.{n}.mixer.q_proj.weight"),
    ("model.layers.{n}.self_attn.k_proj.weight", "layers.{n}.mixer.k_proj.weight"),
    ("model.layers.{n}.self_attn.v_proj.weight", "layers.{n}.mixer.v_proj.weight"),
    ("model.layers.{n}.self_attn.o_proj.weight", "layers.{n}.mixer.o_proj.weight"),
    ("model.layers.{n}.post_attention_layernorm.weight", "layers.{n}.ffn_norm.weight"),
    ("model.layers.{n}.mlp.gate_proj.weight", "layers.{n}.ffn.gate_proj.weight"),
    ("model.layers.{n}.mlp.up_proj.weight", "layers.{n}.ffn.up_proj.weight"),
    ("model.layers.{n}.mlp.down_proj.weight", "layers.{n}.ffn.down_proj.weight"),
)
QK_NORM_KEYS = (
    ("model.layers.{n}.self_attn.q_norm.weight", "layers.{n}.mixer.q_norm.weight"),
    ("model.layers.{n}.self_attn.k_norm.weight", "layers.{n}.mixer.k_norm.weight"),
)
# Buffers some older checkpoints saved although they are derived from the config: skipped on import.
DERIVED_HF_KEY = re.compile(r"(.*\.)?rotary_emb\.inv_freq")


# --dtype values: the torch dtype each names (None: keep the stored one)
DTYPE_NAMES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


def formats() -> dict[str, HFFormat]:
    """Every registered checkpoint format that speaks HF config.json (third-party ones included)."""
    from hyloom.registry import registry

    found = {}
    for reg in registry().all("checkpoint_format"):
        fmt = reg.build(None)
        if all(hasattr(fmt, a) for a in ("model_types", "blueprint", "hf_config", "to_ours", "to_hf")):
            found[reg.name] = fmt
    return found


class ConversionError(CheckpointError):
    """A config or checkpoint a format cannot express. The CLI prints it and exits with status 2."""

    title = "cannot convert"


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)"))


def _rename(key: str, pairs: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in pairs:
        m = pattern.fullmatch(key)
        if m:
            return target.format(**m.groupdict())
    return None


@dataclass(frozen=True)
class HFFormat:
    name: str
    model_types: tuple[str, ...]  # config.json `model_type` values this format reads
    architecture: str  # written to `architectures` on export
    qk_norm: bool
    defaults: dict  # what transformers assumes for a field config.json leaves out (None: derived)
    fields: frozenset  # the fields of transformers' config class: each honoured, checked or inert here
    nullable: tuple = ("num_key_value_heads",)  # fields whose explicit null transformers derives too
    export_fields: dict = field(default_factory=dict)  # format-specific fields written on export
    key_map: tuple[tuple[str, str], ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "key_map", SHARED_KEYS + (QK_NORM_KEYS if self.qk_norm else ()))

    # ---- tensor names --------------------------------------------------------------------------------

    def to_ours(self, hf_key: str) -> str | None:
        """Our name for an HF tensor; None when this format has no such tensor."""
        return _rename(hf_key, [(_pattern(hf), ours) for hf, ours in self.key_map])

    def to_hf(self, our_key: str) -> str | None:
        return _rename(our_key, [(_pattern(ours), hf) for hf, ours in self.key_map])

    # ---- config.json → blueprint ---------------------------------------------------------------------

    def blueprint(self, config: dict, source: str = "config.json") -> dict:
        """The blueprint dict for an HF config, or ConversionError naming every field it cannot honour."""
        problems = [Problem(f, msg, source) for f, msg in self.unsupported(config)]
        missing = [f for f in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
                               "intermediate_size") if config.get(f) is None]
        problems += [Problem(f, "required field is missing", source) for f in missing]
        if problems:
            raise ConversionError(problems)

        def get(name):  # a field left out (or null) means what transformers assumes for it
            return config[name] if config.get(name) is not None else self.defaults[name]

        def derived(name, value):  # absent: transformers' default; null (where allowed): derived from `value`
            found = config[name] if name in config else self.defaults[name]
            return value if found is None else found

        heads = config["num_attention_heads"]
        eps = get("rms_norm_eps")
        mixer = {"type": "attention", "heads": heads, "kv_heads": derived("num_key_value_heads", heads),
                 "head_dim": derived("head_dim", config["hidden_size"] // heads)}
        if self.qk_norm:  # HF normalises q and k with the model's rms_norm_eps
            mixer.update(qk_norm=True, norm_eps=eps)
        n = config["num_hidden_layers"]
        return {"model": {
            "d_model": config["hidden_size"],
            "n_layers": n,
            "vocab_size": config["vocab_size"],
            "max_seq_len": get("max_position_embeddings"),
            "position": rope_position(config, self.defaults["rope_theta"], get("max_position_embeddings")),
            "mixers": {"A": mixer},
            "layout": {"repeat": "A", "times": n},
            "ffn": {"type": "swiglu", "hidden": config["intermediate_size"]},
            "norm": {"type": "rmsnorm", "eps": eps},
            "tie_embeddings": bool(get("tie_word_embeddings")),
        }}

    def unsupported(self, config: dict) -> list[tuple[str, str]]:
        """(field, why) for every setting of `config` this format cannot reproduce."""
        out = []
        model_type = config.get("model_type")
        if model_type is not None and model_type not in self.model_types:
            out.append(("model_type", f"{model_type!r} is not read by format {self.name!r} "
                                      f"(it reads: {', '.join(self.model_types)})"))
        architectures = config.get("architectures") or []
        for arch in [architectures] if isinstance(architectures, str) else architectures:
            if arch != self.architecture:
                out.append(("architectures", f"names {arch!r}; format {self.name!r} reads only "
                                             f"{self.architecture} checkpoints"))
        for name in set(self.defaults) - set(self.nullable) - {"rope_theta"}:
            if name in config and config[name] is None:
                out.append((name, f"is null, which transformers' {self.config_class} refuses; give a value"))
        activation = config.get("hidden_activation", "silu")  # Gemma's name for hidden_act
        if activation != "silu":
            out.append(("hidden_activation", f"{activation!r} is not supported (only 'silu': the FFN is SwiGLU)"))
        act = config.get("hidden_act", "silu")
        if act != "silu":
            out.append(("hidden_act", f"{act!r} is not supported (only 'silu': the FFN is SwiGLU)"))
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag):
                out.append((flag, "biases are not supported (hyloom's projections have none)"))
        if config.get("quantization_config"):
            out.append(("quantization_config", "quantized checkpoints are not supported; use the unquantized one"))
        out += _rope_problems(config)
        # Qwen3 configs always carry a `sliding_window` size; it is in force only with use_sliding_window.
        windowed = config.get("use_sliding_window") if "use_sliding_window" in config else config.get("sliding_window")
        if windowed:
            key = "use_sliding_window" if "use_sliding_window" in config else "sliding_window"
            out.append((key, "sliding-window attention layers are not supported by this import"))
        other_layers = sorted(set(config.get("layer_types") or []) - {"full_attention"})
        if other_layers:
            out.append(("layer_types", f"only 'full_attention' layers are supported, got {other_layers}"))
        # transformers ignores a field its config class does not define, so a field of another family
        # (Granite's *_multiplier and logits_scaling, Gemma's softcapping, MiniCPM's scale_emb, ...) would load
        # as this architecture and compute something else: refused, as the weights were made for that math.
        named = {f for f, _ in out}
        out += [(f, f"is not a field of transformers' {self.config_class}: it may change the math of another "
                    "architecture, which this import would silently ignore; delete it from config.json if it "
                    "has no effect") for f in config if f not in named and not _known(f, self.fields)]
        return out

    @property
    def config_class(self) -> str:
        return self.architecture.removesuffix("ForCausalLM") + "Config"

    # ---- blueprint → config.json ---------------------------------------------------------------------

    def hf_config(self, spec) -> dict:
        """config.json for a validated model spec (or blueprint), or ConversionError naming every blueprint key
        this format cannot express."""
        spec = getattr(spec, "model", spec)
        problems = [Problem(path, msg) for path, msg in self.inexpressible(spec)]
        if problems:
            raise ConversionError(problems)
        first = spec.layers[0]
        heads = first.heads
        theta = float(spec.position.rope_theta)
        config = {
            "architectures": [self.architecture],
            "model_type": self.model_types[0],
            "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model,
            "intermediate_size": spec.ffn.hidden,
            "num_hidden_layers": spec.n_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": first.kv_heads or heads,
            "head_dim": first.head_dim or spec.d_model // heads,
            "hidden_act": "silu",
            "max_position_embeddings": spec.max_seq_len,
            "rms_norm_eps": spec.norm.eps,
            # transformers 5 reads rope_parameters, 4.x reads rope_theta; both agree
            "rope_theta": theta,
            **hf_rope(spec.position, theta),
            "tie_word_embeddings": spec.tie_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            # unknown to the blueprint; explicit nulls keep transformers from assuming its own defaults
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
        }
        config.update(self.export_fields)
        return config

    def inexpressible(self, spec) -> list[tuple[str, str]]:
        """(blueprint key, why) for everything in `spec` that config.json of this format cannot say."""
        out = []
        if not spec.causal:
            out.append(("model.causal", "must be true (HF causal LMs are causal)"))
        for key, kind, want in (("position", spec.position.type, "rope"), ("ffn", spec.ffn.type, "swiglu"),
                                ("norm", spec.norm.type, "rmsnorm")):
            if kind != want:
                out.append((f"model.{key}.type", f"is {kind!r}; {self.name} needs {want!r}"))
        out += _scaling_problems(spec)
        if spec.scale_emb != 1.0 or spec.scale_depth is not None or spec.dim_model_base is not None:
            out.append(("model.scale_emb", f"µP scalars (scale_emb, scale_depth, dim_model_base) have no "
                                           f"{self.name} equivalent"))
        shapes, by_problem = set(), {}  # (symbol, why) -> layers, so a 28-layer blueprint gives one line each
        for i, cfg in enumerate(spec.layers):
            for why in self._layer_problems(cfg, spec):
                by_problem.setdefault((spec.layout[i], why), []).append(i)
            if cfg.type == "attention":
                shapes.add((cfg.heads, cfg.kv_heads or cfg.heads, cfg.head_dim or spec.d_model // cfg.heads))
        for (symbol, why), layers in by_problem.items():
            out.append((f"model.mixers.{symbol}", f"{why} (layers {', '.join(map(str, layers))})"))
        if len(shapes) > 1:
            out.append(("model.mixers", f"every layer needs the same heads/kv_heads/head_dim, got {sorted(shapes)}"))
        return out


    def _layer_problems(self, cfg, spec) -> list[str]:
        if cfg.type != "attention":
            return [f"mixer {cfg.type!r}: {self.name} has only softmax attention layers"]
        out = []
        if cfg.window is not None:
            out.append("a sliding window is not expressible")
        if cfg.gate:
            out.append("an output gate is not expressible")
        if cfg.qk_norm != self.qk_norm:
            out.append(f"qk_norm must be {str(self.qk_norm).lower()} for {self.name}")
        elif cfg.qk_norm and cfg.norm_eps != spec.norm.eps:
            out.append(f"norm_eps {cfg.norm_eps} must equal model.norm.eps {spec.norm.eps} "
                       f"({self.name} uses rms_norm_eps for the q/k norms)")
        return out


def rope_theta(config: dict, default: float) -> float:
    params = config.get("rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return params["rope_theta"]
    return config["rope_theta"] if config.get("rope_theta") is not None else default


def _rope_params(config: dict) -> tuple[str, dict] | None:
    """(key, dict) of the rope settings that choose a scaling: rope_parameters (transformers 5), else
    rope_scaling (4.x); None when neither asks for one."""
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key)
        if isinstance(params, dict) and params.get("rope_type", params.get("type", "default")) != "default":
            return key, params
    return None


LONGROPE_KEYS = {"rope_type", "type", "rope_theta", "short_factor", "long_factor", "original_max_position_embeddings",
                 "factor", "attention_factor", "partial_rotary_factor"}


def _rope_problems(config: dict) -> list[tuple[str, str]]:
    out = []
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key)
        if not params:
            continue
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            out.append((key, "per-layer-type rope parameters are not supported"))
            continue
        name = "rope_type" if "rope_type" in params else "type"  # `type` in configs older than rope_type
        kind = params.get(name, "default")
        if kind == "longrope":
            out += [(f"{key}.{f}", why) for f, why in _longrope_problems(config, params)]
        elif kind != "default":
            out.append((f"{key}.{name}", f"{kind!r} rope scaling is not supported (only 'default' and 'longrope')"))
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            out.append((f"{key}.partial_rotary_factor", "partial rotary embeddings are not supported"))
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        out.append(("partial_rotary_factor", "partial rotary embeddings are not supported"))
    return out


def _longrope_problems(config: dict, params: dict) -> list[tuple[str, str]]:
    out = [(f, "is not supported with longrope") for f in sorted(set(params) - LONGROPE_KEYS)]
    lists = {}
    for f in ("short_factor", "long_factor"):
        v = params.get(f)
        if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) and x > 0 for x in v):
            out.append((f, "must be a non-empty list of positive numbers (one per rotary pair)"))
        else:
            lists[f] = v
    if len(lists) == 2 and len(lists["short_factor"]) != len(lists["long_factor"]):
        out.append(("long_factor", f"has {len(lists['long_factor'])} values, short_factor "
                                   f"{len(lists['short_factor'])}"))
    original = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    if not isinstance(original, int) or original < 1:
        out.append(("original_max_position_embeddings", "a positive integer is required"))
    elif (len(lists) == 2 and lists["short_factor"] != lists["long_factor"]
          and (config.get("max_position_embeddings") or 0) > original):
        # transformers switches lists inside one context, hyloom (like MiniCPM's code) fixes one per context
        out.append(("long_factor", "differs from short_factor while max_position_embeddings exceeds "
                                   "original_max_position_embeddings: transformers switches between them by "
                                   "sequence length, hyloom uses long_factor throughout, so the results would differ"))
    return out


def rope_position(config: dict, default_theta: float, max_positions: int) -> dict:
    """The blueprint's `position` for an HF config whose rope settings passed _rope_problems."""
    position = {"type": "rope", "rope_theta": float(rope_theta(config, default_theta))}
    found = _rope_params(config)
    if found is None:
        return position
    params = found[1]
    scaling = {"type": "longrope", "short_factor": [float(x) for x in params["short_factor"]],
               "long_factor": [float(x) for x in params["long_factor"]],
               "original_max_position_embeddings": params.get("original_max_position_embeddings",
                                                              config.get("original_max_position_embeddings")),
               "max_position_embeddings": max_positions}
    if params.get("attention_factor") is not None:
        scaling["attention_factor"] = float(params["attention_factor"])
    elif params.get("factor") is not None:  # transformers derives the magnitude from `factor` when it is given
        f, original = float(params["factor"]), scaling["original_max_position_embeddings"]
        scaling["attention_factor"] = math.sqrt(1 + math.log(f) / math.log(original)) if f > 1 else 1.0
    return {**position, "scaling": scaling}


def hf_rope(position, theta: float) -> dict:
    """config.json's rope fields for a `rope` position: transformers 5 reads rope_parameters, 4.x rope_theta and
    rope_scaling; all are written and agree. The magnitude is written out so no version re-derives it."""
    scaling = position.scaling
    if scaling is None:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    longrope = {"rope_type": "longrope", "short_factor": list(scaling.short_factor),
                "long_factor": list(scaling.long_factor),
                "original_max_position_embeddings": scaling.original_max_position_embeddings,
                "attention_factor": scaling.magnitude()}
    return {"rope_parameters": {**longrope, "rope_theta": theta}, "rope_scaling": longrope}


def _scaling_problems(spec) -> list[tuple[str, str]]:
    scaling = getattr(spec.position, "scaling", None)
    if scaling is None:
        return []
    out = []
    if scaling.max_position_embeddings != spec.max_seq_len:
        out.append(("model.position.scaling.max_position_embeddings",
                    f"is {scaling.max_position_embeddings}; config.json has one max_position_embeddings, "
                    f"model.max_seq_len ({spec.max_seq_len})"))
    if scaling.extended() and scaling.short_factor != scaling.long_factor:
        out.append(("model.position.scaling.long_factor",
                    "differs from short_factor in an extended context: transformers would use short_factor for "
                    "sequences within original_max_position_embeddings, hyloom uses long_factor throughout"))
    return out


# Fields any transformers config may carry that take no part in a causal LM's forward pass: bookkeeping, label
# maps, output switches, and the generation settings older configs stored beside the model.
INERT_FIELDS = frozenset("""
    architectures model_type transformers_version dtype torch_dtype use_cache initializer_range attention_dropout
    bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id output_attentions output_hidden_states
    return_dict torchscript use_bfloat16 tf_legacy_loss id2label label2id num_labels problem_type finetuning_task
    tokenizer_class prefix task_specific_params chunk_size_feed_forward is_encoder_decoder is_decoder
    add_cross_attention tie_encoder_decoder cross_attention_hidden_size pruned_heads max_length min_length do_sample
    early_stopping num_beams num_beam_groups diversity_penalty temperature top_k top_p typical_p repetition_penalty
    length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences
    output_scores return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
""".split())
# Fields that `unsupported` and the rope mapping read whatever the class: checked, refused or honoured there.
CHECKED_FIELDS = frozenset("""
    quantization_config hidden_activation partial_rotary_factor rope_theta rope_scaling rope_parameters
    original_max_position_embeddings transformers_weights
""".split())


def _known(name: str, fields: frozenset) -> bool:
    # `_name_or_path`-style private fields and tool stamps (`unsloth_version`) describe no computation
    return name in fields or name in INERT_FIELDS or name in CHECKED_FIELDS or name.startswith("_") \
        or name.endswith("_version")


_DECODER_FIELDS = """vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads
    head_dim hidden_act max_position_embeddings rms_norm_eps tie_word_embeddings attention_bias"""
LLAMA = HFFormat(
    name="llama", model_types=("llama",), architecture="LlamaForCausalLM", qk_norm=False,
    defaults={"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
              "tie_word_embeddings": False, "num_key_value_heads": None, "head_dim": None},
    fields=frozenset(f"{_DECODER_FIELDS} mlp_bias pretraining_tp".split()),
    nullable=("num_key_value_heads", "head_dim"),
    export_fields={"mlp_bias": False},
)
QWEN3 = HFFormat(
    name="qwen3", model_types=("qwen3",), architecture="Qwen3ForCausalLM", qk_norm=True,
    # Qwen3Config's own defaults, not derived from the shape: 32 kv heads, head_dim 128
    defaults={"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768,
              "tie_word_embeddings": False, "num_key_value_heads": 32, "head_dim": 128},
    fields=frozenset(f"{_DECODER_FIELDS} use_sliding_window sliding_window max_window_layers layer_types".split()),
    export_fields={"use_sliding_window": False, "sliding_window": None},
)
FORMATS = {f.name: f for f in (LLAMA, QWEN3)}
