"""`hyloom generate`: continue prompts with a checkpoint. The `ar` sampler runs the inference engine directly
(a single prompt streams its tokens as they come; prefill time, decode tokens/s and peak memory on stderr);
any other sampler (`mdm`, ...) runs through hyloom.generate.run_sampler."""

from __future__ import annotations

import sys


def add_generate(sub):
    from hyloom.cli.commands import _arg, _escapes
    from hyloom.cli.parser import command_parser

    positive = _arg(int, lambda v: v >= 1, "a positive integer")
    p = command_parser(sub, "generate", "continue prompts with a trained checkpoint",
                       "  hyloom generate runs/tiny --prompt 'def '           the run's newest checkpoint\n"
                       "  hyloom generate runs/tiny/checkpoint-000300 --prompt 'import ' --prompt 'class ' "
                       "--temperature 0 --max-new-tokens 40\n"
                       "  hyloom generate runs/tiny --prompt 'def ' --stop '\\n\\n' --top-p 0.9 --device cuda\n"
                       "  hyloom generate runs/big --prompt-file book.txt --context 131072 --chunk-size 16384\n")
    p.add_argument("checkpoint", help="a checkpoint directory (with tokenizer.json), or a run directory: its newest")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="may repeat: one batch of prompts")
    source.add_argument("--prompt-file", metavar="PATH", help="one prompt: the text of this file")
    p.add_argument("--context", type=positive, default=None, metavar="N",
                   help="one prompt of exactly N tokens: its text repeated (or cut) to that length, for "
                        "long-context tries")
    p.add_argument("--chunk-size", type=positive, default=None, metavar="N",
                   help="prefill at most N tokens per row at a time (bounds activation memory; default: one pass)")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA (default: CUDA graphs)")
    p.add_argument("--compile", action="store_true",
                   help="run the decode step through torch.compile (fuses its small kernels; the first step "
                        "compiles, taking a while; not yet measured to win)")
    p.add_argument("--max-new-tokens", type=_arg(int, lambda v: v >= 0, "an integer >= 0"), default=64)
    p.add_argument("--sampler", default=None, help="a registered sampler (hyloom ls sampler); default: ar for a causal "
                                                   "model, mdm for a bidirectional one")
    p.add_argument("--temperature", type=_arg(float, lambda v: 0 <= v < float("inf"), "a number >= 0"), default=None,
                   help="0: greedy (default: 0.8 with ar, 0 with mdm)")
    p.add_argument("--top-k", type=_arg(int, lambda v: v >= 1, "an integer >= 1"), default=None,
                   help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=_arg(float, lambda v: 0 < v <= 1, "a number in (0, 1]"), default=None,
                   help="sample among the likeliest tokens that make up this probability (0 < p <= 1)")
    p.add_argument("--stop", action="append", type=_escapes, default=None, metavar="TEXT",
                   help="may repeat: end a continuation before this text (\\n and \\t read as newline and tab)")
    p.add_argument("--steps", type=_arg(int, lambda v: v >= 1, "an integer >= 1"), default=None,
                   help="mdm: denoising steps per block (default: block length, one token a step)")
    p.add_argument("--block-length", type=_arg(int, lambda v: v >= 1, "an integer >= 1"), default=None,
                   help="mdm: masks per semi-autoregressive block; must divide --max-new-tokens (default: one block)")
    p.add_argument("--remasking", choices=["low_confidence", "random"], default=None,
                   help="mdm: commit the most confident predictions (default) or random ones")
    p.add_argument("--threshold", type=_arg(float, lambda v: 0 < v < 1, "a number in (0, 1)"), default=None,
                   help="mdm: commit every prediction above this confidence (at least one a step)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from hyloom.blueprint import BlueprintError, Problem
    from hyloom.checkpoint import BLUEPRINT
    from hyloom.errors import SetupError
    from hyloom.generate import BIDIRECTIONAL, cut_at_stop, default_sampler, run_sampler
    from hyloom.registry import registry
    from hyloom.train import open_checkpoint

    if args.context is not None and args.prompt is not None and len(args.prompt) > 1:
        raise SetupError("--context makes one prompt: give one --prompt (or --prompt-file)")
    text = _read_prompt_file(args.prompt_file) if args.prompt_file else None

    def check(bp, path):
        sampler = args.sampler or ("ar" if bp.model.causal else "mdm")
        if sampler == "ar" and not bp.model.causal:
            raise BlueprintError([Problem("model.causal", f"cannot generate with the ar sampler: {BIDIRECTIONAL}; "
                                                          "use --sampler mdm", str(path / BLUEPRINT))])

    _, model, bp, tokenizer, _ = open_checkpoint(args.checkpoint, args.device, refuse=check)
    sampler = args.sampler or default_sampler(model)
    options = {k: v for k, v in {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                 "top_k": args.top_k, "top_p": args.top_p, "steps": args.steps,
                                 "block_length": args.block_length, "remasking": args.remasking,
                                 "threshold": args.threshold}.items() if v is not None}
    if sampler == "ar":
        options.setdefault("temperature", 0.8)
    if sampler == "mdm":
        saved = getattr(getattr(bp.train, "objective", None), "mask_id", None)  # the mask id it was trained with
        if saved is not None:
            options["mask_id"] = saved
    reg = registry().get("sampler", sampler)
    foreign = ["--" + k.replace("_", "-") for k in options if k not in reg.config.model_fields]
    if foreign:
        raise SetupError(f"{', '.join(foreign)}: not an option of the {sampler} sampler")
    if args.compile and sampler != "ar":
        raise SetupError(f"--compile compiles the autoregressive decode step; the {sampler} sampler has none")
    texts = [text] if text is not None else args.prompt
    prompts = [tokenizer.encode(t) for t in texts]
    shown = list(texts)
    if args.context is not None:
        prompts = [_to_length(prompts[0], args.context)]
        shown = [f"[prompt: {args.context:,} tokens from {args.prompt_file or 'the --prompt text'}]\n"]
    elif args.prompt_file:
        shown = [f"[prompt: {len(prompts[0]):,} tokens from {args.prompt_file}]\n"]
    if not all(prompts):
        raise SetupError("a prompt encodes to no tokens: give some text")
    if sampler != "ar":
        try:
            got = run_sampler(model.eval(), prompts, sampler=sampler, tokenizer=tokenizer, seed=args.seed,
                              stop_strings=args.stop or (), **options)
        except ValueError as exc:  # a bad value for this sampler (a block length that does not divide, ...)
            raise SetupError(str(exc)) from None
        for prompt, out in zip(shown, got.tokens):
            out_text = tokenizer.decode(out)
            cut = cut_at_stop(out_text, args.stop or ())
            print(prompt + (out_text if cut is None else cut))
        print(f"sampler {sampler}: {got.nfe} forward passes (NFE), {got.produced} tokens in {got.seconds:.2f} s "
              f"({got.tokens_per_s:,.0f} tokens/s)", file=sys.stderr)
        return 0
    return _autoregressive(model.eval(), prompts, shown, tokenizer, reg.config(**options), args)


def _autoregressive(model, prompts, shown, tokenizer, cfg, args) -> int:
    import torch

    from hyloom.errors import SetupError
    from hyloom.generate import cut_at_stop, generate
    from hyloom.inference import GIB, DoesNotFit, check_fits

    device = next(model.parameters()).device
    longest = max(map(len, prompts))
    if longest + cfg.max_new_tokens > model.spec.max_seq_len:
        print(f"hyloom: warning: {longest + cfg.max_new_tokens:,} tokens is longer than model.max_seq_len "
              f"({model.spec.max_seq_len:,}), the longest sequence this model is meant for", file=sys.stderr)
    try:
        check_fits(model, batch=len(prompts), tokens=longest + cfg.max_new_tokens, chunk_size=args.chunk_size)
    except DoesNotFit as exc:
        raise SetupError(str(exc)) from None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stops = args.stop or ()
    stream = _Stream(tokenizer, stops, shown[0]) if len(prompts) == 1 else None
    timings = {}
    generator = torch.Generator(device).manual_seed(args.seed)
    try:
        out = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       top_k=cfg.top_k, top_p=cfg.top_p, stop_tokens=[tokenizer.eos_id], stop_strings=stops,
                       decode=tokenizer.decode, generator=generator, chunk_size=args.chunk_size,
                       cuda_graph=False if args.no_cuda_graph else None, compile_decode=args.compile,
                       on_token=stream.add if stream else None, timings=timings)
    except torch.OutOfMemoryError as exc:
        raise SetupError(f"out of memory while generating (the estimate said it would fit): "
                         f"{str(exc).splitlines()[0]}") from None
    if stream is not None:
        stream.finish(out[0])
    else:
        for prompt, tokens in zip(shown, out):
            text = tokenizer.decode(tokens)
            cut = cut_at_stop(text, stops)
            print(prompt + (text if cut is None else cut))
    produced, steps = sum(map(len, out)), timings.get("decode_steps", 0)
    seconds = timings.get("prefill_s", 0.0) + timings.get("decode_s", 0.0)
    print(f"sampler ar: {1 + steps if produced else 0} forward passes (NFE), {produced} tokens in {seconds:.2f} s "
          f"({produced / max(seconds, 1e-9):,.0f} tokens/s)", file=sys.stderr)
    decode_rate = steps * len(prompts) / max(timings.get("decode_s", 0.0), 1e-9)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss()) / GIB
    print(f"prefill {timings.get('prefill_s', 0.0):.3f} s ({longest:,} tokens × {len(prompts)}), decode "
          f"{decode_rate:,.1f} tokens/s, peak memory {peak:.2f} GiB"
          f"{'' if device.type == 'cuda' else ' (process, resident)'}", file=sys.stderr)
    return 0


class _Stream:
    """Prints one continuation as its tokens come. Text that could still turn out to be the start of a stop
    string, or an incomplete UTF-8 character, is held back until it is settled."""

    def __init__(self, tokenizer, stops, prompt_shown: str):
        self.tokenizer, self.stops, self.tokens, self.printed = tokenizer, stops, [], 0
        self.hold = max((len(s) for s in stops), default=1) - 1
        print(prompt_shown, end="", flush=True)

    def add(self, row: int, token: int) -> None:
        from hyloom.generate import cut_at_stop

        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if cut_at_stop(text, self.stops) is not None:
            return  # generation stops here; finish prints the cut text
        settled = text[:len(text) - self.hold].rstrip("\ufffd")
        if len(settled) > self.printed:
            print(settled[self.printed:], end="", flush=True)
            self.printed = len(settled)

    def finish(self, tokens) -> None:
        from hyloom.generate import cut_at_stop

        text = self.tokenizer.decode(tokens)
        cut = cut_at_stop(text, self.stops)
        print((text if cut is None else cut)[self.printed:], flush=True)


def _to_length(tokens: list[int], n: int) -> list[int]:
    """`tokens` repeated until there are `n` (or its first `n`)."""
    return (tokens * -(-n // len(tokens)))[:n] if tokens else tokens


def _read_prompt_file(path: str) -> str:
    from hyloom.errors import SetupError

    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SetupError(f"--prompt-file {path}: cannot read it ({exc})") from None


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
