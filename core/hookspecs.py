"""The hook specifications: one `hyloom_register_<kind>s` hook per component kind.

Every hook receives a single argument, `register`, a callable bound to the plugin that is registering (so
the registry knows which distribution provides each name). See `hyloom.registry.Register` for its
signature and `docs/plugins.md` for a worked example.
"""

import pluggy

PROJECT = "hyloom"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# kind -> hook name. The order is the order `hyloom ls` prints.
KINDS = {
    "mixer": "hyloom_register_mixers",
    "position": "hyloom_register_positions",
    "ffn": "hyloom_register_ffns",
    "norm": "hyloom_register_norms",
    "selector": "hyloom_register_selectors",
    "data_source": "hyloom_register_data_sources",
    "data_tier": "hyloom_register_data_tiers",
    "tokenizer": "hyloom_register_tokenizers",
    "trainer": "hyloom_register_trainers",
    "objective": "hyloom_register_objectives",
    "eval_task": "hyloom_register_eval_tasks",
    "verifier": "hyloom_register_verifiers",
    "sampler": "hyloom_register_samplers",
    "checkpoint_format": "hyloom_register_checkpoint_formats",
    "command": "hyloom_register_commands",
}


class HyloomSpec:
    @hookspec
    def hyloom_register_mixers(self, register):
        """Token mixers (attention, sparse attention, linear attention...): `build(config, layer, model)` → `Mixer`."""

    @hookspec
    def hyloom_register_positions(self, register):
        """Position policies (rope, nope, hype...): `build(config)` → `PositionPolicy`."""

    @hookspec
    def hyloom_register_ffns(self, register):
        """Feed-forward blocks: `build(config, d_model)` → `nn.Module` mapping [B, T, d] → [B, T, d]."""

    @hookspec
    def hyloom_register_norms(self, register):
        """Normalisation layers: `build(config, dim)` → `nn.Module`."""

    @hookspec
    def hyloom_register_selectors(self, register):
        """Layer selectors: `build(config)` → object with `check(n_layers, budget, *, heldout=True)` (refuses bad
        input before any work) and `select(ctx: SelectionContext) -> Selection` (the kept attention layers, a
        score row per layer, `write(out_dir)` → selection.json + selection.png); both types are in
        `hyloom.plugins.convert.selection`. Configs take `pin: [...]`, layers always kept within the budget."""

    @hookspec
    def hyloom_register_data_sources(self, register):
        """Data sources: `build(config)` → iterable of documents `{"text": str, "meta": dict}`."""

    @hookspec
    def hyloom_register_data_tiers(self, register):
        """Data-tier steps (filters, scorers): `build(config)` → callable judging one document."""

    @hookspec
    def hyloom_register_tokenizers(self, register):
        """Tokenizers: `build(config)` → object with `encode(text)` / `decode(ids)`."""

    @hookspec
    def hyloom_register_trainers(self, register):
        """Trainers: `build(config)` → object with `fit(model, data, config)`."""

    @hookspec
    def hyloom_register_objectives(self, register):
        """Training objectives: `build(config)` → callable `(model, batch) -> loss`."""

    @hookspec
    def hyloom_register_eval_tasks(self, register):
        """Evaluation tasks: `build(config)` → object with `run(ctx: hyloom.eval.EvalContext) -> EvalResult`."""

    @hookspec
    def hyloom_register_samplers(self, register):
        """Samplers chosen by `hyloom generate --sampler NAME`: `build(config)` → object with
        `sample(model, prompts, *, tokenizer, generator, stop_strings) -> hyloom.generate.SampleResult`."""

    @hookspec
    def hyloom_register_verifiers(self, register):
        """Reward verifiers for RL: `build(config)` → callable `(record: dict, completion: str) -> Reward` (`reward:
        float`, `info: dict`; hyloom.plugins.rl.config.Reward). The record is the whole prompt row."""

    @hookspec
    def hyloom_register_checkpoint_formats(self, register):
        """Checkpoint formats (Hugging Face key mappings): `build(config)` → format object."""

    @hookspec
    def hyloom_register_commands(self, register):
        """CLI subcommands: `build(subparsers)` adds an argparse parser whose `func(args)` runs it."""
