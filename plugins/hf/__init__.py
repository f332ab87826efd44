"""Hugging Face checkpoints: the `llama` and `qwen3` checkpoint formats and the `import-hf` / `export-hf`
commands. See docs/hf.md. Registering them imports no torch; the conversion functions load on first use."""

from hyloom.hookspecs import hookimpl
from hyloom.plugins.hf.formats import FORMATS, LLAMA, QWEN3, ConversionError, HFFormat

_CONVERT = ("import_hf", "export_hf", "hf_config_for")


def __getattr__(name):
    if name in _CONVERT:
        from hyloom.plugins.hf import convert

        return getattr(convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def hyloom_register_checkpoint_formats(register):
    # The format objects carry no options, so `build` ignores its config.
    register("llama", lambda config=None: LLAMA, summary="Hugging Face Llama (LlamaForCausalLM) config and key names")
    register("qwen3", lambda config=None: QWEN3,
             summary="Hugging Face Qwen3 (Qwen3ForCausalLM): Llama plus q/k RMSNorm")


@hookimpl
def hyloom_register_commands(register):
    from hyloom.plugins.hf.cli import add_export_hf, add_import_hf

    register("import-hf", add_import_hf, summary="convert a Hugging Face Llama/Qwen3 directory to a checkpoint")
    register("export-hf", add_export_hf, summary="write a checkpoint as a Hugging Face Llama/Qwen3 directory")


__all__ = ["HFFormat", "LLAMA", "QWEN3", "FORMATS", "ConversionError", *_CONVERT]
