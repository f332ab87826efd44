"""The built-in data components: sources (stdlib, pysource, jsonl, text, parquet, mix), tier steps (length, symbols,
digits, repeated_lines, non_text, dedup_exact, dedup_near), tokenizers (bpe, file) and the `hyloom data` command."""

from hyloom.hookspecs import hookimpl
from hyloom.plugins.data import bpe, dedup, filters, mix, pysource, sources
from hyloom.plugins.data.cli import add_data


@hookimpl
def hyloom_register_data_sources(register):
    register("stdlib", sources.StdlibSource, config=sources.StdlibConfig,
             summary="the running Python's standard library source, one document per .py file (offline)",
             example={"type": "stdlib", "max_bytes": 200_000})
    register("pysource", pysource.PysourceSource, config=pysource.PysourceConfig,
             summary="the Python source of the installed packages and the standard library, each distinct file once "
                     "(offline)", example={"type": "pysource", "max_bytes": 2_000_000})
    register("jsonl", sources.JsonlSource, config=sources.JsonlConfig,
             summary="JSON Lines files, the text in one field", example={"type": "jsonl", "path": "data/train.jsonl"})
    register("text", sources.TextSource, config=sources.TextConfig,
             summary="text files, one document per file or per paragraph", example={"type": "text", "path": "books/"})
    register("parquet", sources.ParquetSource, config=sources.ParquetConfig,
             summary="Parquet files, one row a document (needs pyarrow)",
             example={"type": "parquet", "path": "data/", "text_field": "text"})
    register("mix", mix.MixSource, config=mix.MixConfig,
             summary="several sources, each a share of the training tokens (drawn at preparation, by seed)",
             example={"type": "mix", "sources": [{"source": {"type": "stdlib"}, "weight": 0.8},
                                                 {"source": {"type": "mqar", "documents": 4000}, "weight": 0.2,
                                                  "tiers": []}]})


@hookimpl
def hyloom_register_data_tiers(register):
    for name, build, config, summary in [
        ("length", filters.length, filters.LengthConfig, "drop documents that are too short or too long"),
        ("symbols", filters.symbols, filters.SymbolsConfig, "drop symbol soup (share of non-alphanumeric characters)"),
        ("digits", filters.digits, filters.DigitsConfig, "drop digit-heavy documents (generated tables)"),
        ("repeated_lines", filters.repeated_lines, filters.RepeatedLinesConfig,
         "drop documents made of repeated lines"),
        ("non_text", filters.non_text, filters.NonTextConfig, "drop binaries: control characters, invalid UTF-8"),
        ("dedup_exact", dedup.dedup_exact, dedup.DedupExactConfig, "drop exact copies (normalised text hash)"),
        ("dedup_near", dedup.dedup_near, dedup.DedupNearConfig,
         "drop near-duplicates (MinHash over word shingles, LSH banding)"),
    ]:
        register(name, build, config=config, summary=summary, example={"type": name})


@hookimpl
def hyloom_register_tokenizers(register):
    register("bpe", bpe.BPETrainer, config=bpe.BPEConfig,
             summary="byte-level BPE trained on the training split, cached by content",
             example={"type": "bpe", "vocab_size": 512})
    register("file", bpe.FileTokenizer, config=bpe.FileTokenizerConfig,
             summary="a Hugging Face tokenizer.json", example={"type": "file", "path": "tokenizer.json"})


@hookimpl
def hyloom_register_commands(register):
    register("data", add_data, summary="prepare training data or report on it")
