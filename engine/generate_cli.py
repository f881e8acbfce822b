"""One-shot CLI: `python -m engine.generate_cli --prompt "..." [--chat] [engine flags]`, text printed as sampled."""
from __future__ import annotations

import sys
import time

from absl import flags

from engine.flags import FlagError, config_from_flags, define_flags, parse_argv


def _define_generate_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("prompt", None, "Prompt text (with --chat: the user message).", flag_values=fv)
    flags.DEFINE_boolean("chat", False, "Render the prompt with the model's chat template.", flag_values=fv)
    flags.DEFINE_string("system", None, "System message for --chat (default: the template's).", flag_values=fv)
    flags.DEFINE_integer("max-tokens", 256, "Most tokens to generate.", flag_values=fv)
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.", flag_values=fv)
    flags.DEFINE_float("top-p", 1.0, "Nucleus sampling mass in (0, 1].", flag_values=fv)
    flags.DEFINE_integer("top-k", 0, "Sample among the k most likely tokens; 0 = off.", flag_values=fv)
    flags.DEFINE_integer("sampling-seed", None, "Seed of this request's sampler.", flag_values=fv)


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    define_flags(fv)
    _define_generate_flags(fv)
    try:
        parse_argv(argv, fv)
        config, _ = config_from_flags(fv)
        if not fv["prompt"].value:
            raise FlagError("--prompt is required (the text to complete, or the user message with --chat)")
        from engine.core.request import Request
        from engine.core.sampling_params import SamplingParams
        sampling = SamplingParams(max_tokens=fv["max-tokens"].value, temperature=fv["temperature"].value,
                                  top_p=fv["top-p"].value, top_k=fv["top-k"].value, seed=fv["sampling-seed"].value)
        from engine.core.engine import LLMEngine
        t0 = time.perf_counter()
        engine = LLMEngine(config)
        tok = engine.tokenizer
        text = fv["prompt"].value
        if fv["chat"].value:
            messages = ([{"role": "system", "content": fv["system"].value}] if fv["system"].value else [])
            ids = tok.encode_chat(messages + [{"role": "user", "content": text}])
        else:
            ids = tok.encode(text)
        request = Request("generate-0", tuple(ids), sampling)
        stream = engine.add_request(request)
    except (FlagError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    load_s, t1 = time.perf_counter() - t0, time.perf_counter()
    first, n = None, 0
    while not stream.finished:
        engine.step()
        for out in stream.drain():
            first = first or time.perf_counter()
            n += len(out.new_token_ids)
            print(out.text, end="", flush=True)
    end = time.perf_counter()
    print(f"\n[{out.finish_reason.value}; {out.prompt_tokens} prompt + {n} new tokens; load {load_s:.1f} s, "
          f"first token {(first or end) - t1:.2f} s, all {end - t1:.2f} s (first-use compiles included)]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
