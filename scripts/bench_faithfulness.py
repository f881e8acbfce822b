"""How long a quantized engine's greedy tokens stay equal to our float32 engine's (the README's "q8_0
faithfulness" paragraph): 10 fixed chat prompts x --tokens greedy tokens, the common-prefix length per
prompt and its mean. Quantization changes logits a little; greedy decoding turns the first flipped near-tie
into a different continuation, so the common prefix is a strict, easy-to-read yardstick.

    python scripts/bench_faithfulness.py [--encoding q8_0] [--tokens 64] [--llama-python LLAMA_VENV/bin/python]

Compared against float32: our engine at --encoding (engine.LLM(quantization_encoding=...)), and llama.cpp
on the same GGUF with its own tensor types (Q4_1 for the embedded SmolLM2), fed the same prompt token ids,
run by `scripts/bench_llamacpp.py --greedy` under --llama-python (llama.cpp's own venv, see that script;
default: this interpreter, only when llama_cpp is importable here; --no-llama-cpp leaves it out).
Every answer runs past EOS (ignore_eos), so each prompt compares exactly --tokens tokens. All prompts run in
one batch, the same for every encoding. Deterministic: no timing, so a busy machine does not change it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout
from engine import LLM, SamplingParams

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning a new language.",
    "What is 17 times 23? Show your working.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "Write a Python function that reverses a string.",
    "What are the main differences between a cat and a dog as pets?",
    "Translate 'Good morning, how are you?' into Spanish.",
    "Describe how a bicycle works to a ten-year-old.",
)
ENGINE_OPTS = dict(max_batch_size=16, max_length=512)


def common_prefix(a, b) -> int:
    """The number of leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def engine_tokens(model_path, encoding: str, chats, n: int):
    """(greedy token ids per chat, prompt token ids per chat, the resolved model path) of our engine."""
    llm = LLM(model_path, quantization_encoding=encoding, **ENGINE_OPTS)
    outs = llm.generate(chats, SamplingParams(max_tokens=n, ignore_eos=True))
    return [o.token_ids for o in outs], [o.prompt_token_ids for o in outs], llm.config.model_path


def llama_cpp_tokens(python: str, model_path: str, prompt_ids, n: int):
    """Greedy token ids per prompt from llama.cpp on model_path (a .gguf file), decoded by `python`
    running bench_llamacpp.py --greedy; SystemExit with its message when that fails (llama_cpp missing)."""
    script = str(Path(__file__).with_name("bench_llamacpp.py"))
    done = subprocess.run([python, script, "--greedy", str(n), "--model-path", model_path],
                          input=json.dumps([list(p) for p in prompt_ids]), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr.strip() or f"{script} --greedy failed (exit {done.returncode})")
    return json.loads(done.stdout)


def llama_python(args) -> str | None:
    """The interpreter that runs llama.cpp, or None to leave llama.cpp out. Checked before any engine runs,
    so a missing llama_cpp under an explicit --llama-python fails at once."""
    if args.no_llama_cpp:
        return None
    if args.llama_python is None:
        return sys.executable if importlib.util.find_spec("llama_cpp") is not None else None
    script = str(Path(__file__).with_name("bench_llamacpp.py"))
    done = subprocess.run([args.llama_python, script, "--greedy", "0"], input="[]", capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr.strip() or f"{args.llama_python} cannot run {script}")
    return args.llama_python


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--encoding", default="q8_0", help="the engine encoding compared with float32")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    ap.add_argument("--llama-python", default=None, help="the interpreter of llama.cpp's venv")
    ap.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--output", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    python = llama_python(args)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    reference, prompt_ids, path = engine_tokens(args.model_path, "float32", chats, args.tokens)
    others = {f"{args.encoding}_vs_float32": engine_tokens(args.model_path, args.encoding, chats, args.tokens)[0]}
    if python is not None and path.endswith(".gguf"):
        others["llama_cpp_vs_float32"] = llama_cpp_tokens(python, path, prompt_ids, args.tokens)
    elif python is not None:
        print(f"llama.cpp left out: {path} is not a .gguf file", file=sys.stderr)
    per_prompt = [{"prompt": p, **{k: common_prefix(ref, toks[i]) for k, toks in others.items()}}
                  for i, (p, ref) in enumerate(zip(PROMPTS, reference))]
    results = {"model": path, "tokens": args.tokens, "prompts": len(PROMPTS),
               "mean_common_prefix": {k: statistics.mean(r[k] for r in per_prompt) for k in others},
               "per_prompt": per_prompt}
    print(json.dumps(results, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
