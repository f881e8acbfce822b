"""Batch generation: JSONL requests in, JSONL results out, through the offline engine or a running server.

    python scripts/batch_generate.py --input requests.jsonl --output results.jsonl --max-batch-size 16
    python scripts/batch_generate.py --input requests.jsonl --output results.jsonl --target localhost:50051

Input lines: {"id", one of "prompt" | "messages" | "prompt_token_ids", optional max_tokens, temperature,
top_p, top_k, seed, stop, ignore_eos}. Output lines, in input order:
{"id", "text", "token_ids", "finish_reason", "usage": {prompt_tokens, completion_tokens, cached_prompt_tokens}},
or {"id", "line", "error"} for a line that cannot be parsed or a request that failed (the run goes on).
The offline engine runs with prefix caching on (--no-prefix-caching turns it off) and takes the server's
engine flags; it gets each --batch-size lines in one `generate` call so they batch together.
--resume keeps the output file's finished records (each id once) and runs the rest again: ids it lacks,
error records, and results cut off by a server shutdown or an engine fault (finish_reason "abort").
Every record is fsynced as it is written, and so is the final file and its directory.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout
from engine import ENGINE_OPTIONS
from scripts.batch_io import (Item, OrderedWriter, error_record, open_output, read_done,
                              read_input, result_record, rewrite_in_order)
from scripts.durable_io import fsync_dir

_ARG_TYPES = {"string": str, "integer": int, "float": float}
# Engine flags that mean nothing here: caching has its own switch (on by default for batch jobs).
_SKIPPED_ENGINE_OPTIONS = ("enable-prefix-caching",)
CONNECT_TIMEOUT_S = 30


class OfflineBackend:
    """The in-process engine (`engine.LLM`); each batch of items is one `generate` call."""

    def __init__(self, engine_options: dict, batch_size: int):
        from engine import LLM
        self.llm, self.batch_size = LLM(**engine_options), batch_size

    def _request(self, item: Item):
        """(prompt ids, SamplingParams) for the item; ValueError when the engine cannot run it."""
        ids = list(self.llm.prompt_token_ids(item.value))
        params = self.llm.sampling_params(len(ids), **item.sampling)  # an unset max_tokens: as the server
        self.llm.validate(ids, params)
        return ids, params

    def run(self, items: list[Item], emit) -> None:
        for start in range(0, len(items), self.batch_size):
            batch, runnable = items[start:start + self.batch_size], []
            for item in batch:
                try:
                    runnable.append((item, *self._request(item)))
                except (ValueError, TypeError) as e:  # a bad role, a too-long prompt, ...
                    emit(item.index, error_record(item.id, item.line, str(e)))
            self._generate(runnable, emit)

    def _generate(self, runnable: list, emit) -> None:
        if not runnable:
            return
        try:
            outs = self.llm.generate([ids for _, ids, _ in runnable], [p for _, _, p in runnable])
        except Exception as e:  # the whole call failed: report it on each of its items, go on with the next
            for item, _, _ in runnable:
                emit(item.index, error_record(item.id, item.line, f"{type(e).__name__}: {e}"))
            return
        for (item, ids, _), out in zip(runnable, outs):
            emit(item.index, result_record(item.id, out.token_ids, out.text, out.finish_reason, len(ids),
                                           out.cached_prompt_tokens))


class ServerBackend:
    """A running engine server over gRPC, --max-concurrency streams at once."""

    def __init__(self, target: str, max_concurrency: int, timeout: float):
        import grpc
        from engine.v1 import engine_pb2, engine_pb2_grpc
        self.grpc, self.pb = grpc, engine_pb2
        self.channel = grpc.insecure_channel(target)
        self.stub = engine_pb2_grpc.EngineStub(self.channel)
        self.max_concurrency, self.timeout = max_concurrency, timeout
        try:  # fail once, clearly, rather than once per line
            grpc.channel_ready_future(self.channel).result(timeout=CONNECT_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise ValueError(f"--target={target}: no server answered within {CONNECT_TIMEOUT_S} s") from None

    def _request(self, item: Item):
        pb, s = self.pb, item.sampling
        sampling = pb.SamplingParams(temperature=s.get("temperature", 0.0), top_k=s.get("top_k", 0),
                                     ignore_eos=s.get("ignore_eos", False),
                                     stop=[s["stop"]] if isinstance(s.get("stop"), str) else s.get("stop", []))
        for key in ("max_tokens", "top_p", "seed"):  # optional in the proto: set only when given
            if key in s:
                setattr(sampling, key, s[key])
        request = pb.GenerateRequest(sampling=sampling)
        if item.kind == "prompt":
            request.prompt = item.value
        elif item.kind == "messages":
            for m in item.value:
                request.messages.messages.add(role=str(m.get("role", "")), content=str(m.get("content", "")))
        else:
            request.prompt_token_ids.ids.extend(item.value)
        return request

    def _one(self, item: Item) -> dict:
        tokens, texts, last = [], [], None
        try:
            for response in self.stub.Generate(self._request(item), timeout=self.timeout):
                tokens.extend(response.token_ids)
                texts.append(response.text)
                last = response
        except self.grpc.RpcError as e:
            return error_record(item.id, item.line, f"{e.code().name}: {e.details()}")
        except ValueError as e:  # e.g. a token id beyond int32
            return error_record(item.id, item.line, str(e))
        if last is None:
            return error_record(item.id, item.line, "the server closed the stream without a reply")
        reason = self.pb.GenerateResponse.FinishReason.Name(last.finish_reason).lower()
        return result_record(item.id, tokens, "".join(texts), reason, last.usage.prompt_tokens,
                             last.usage.cached_prompt_tokens)

    def run(self, items: list[Item], emit) -> None:
        with ThreadPoolExecutor(max(1, min(self.max_concurrency, len(items)))) as pool:
            for item, record in zip(items, pool.map(self._one, items)):
                emit(item.index, record)
        self.channel.close()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="JSONL requests")
    p.add_argument("--output", required=True, help="JSONL results (overwritten unless --resume)")
    p.add_argument("--target", help="a running server host:port (default: the offline engine in this process)")
    p.add_argument("--max-concurrency", type=int, default=32, help="--target: streams in flight")
    p.add_argument("--batch-size", type=int, default=256, help="offline: lines per generate call")
    p.add_argument("--timeout", type=float, default=3600.0, help="--target: per-request deadline in seconds")
    p.add_argument("--resume", action="store_true", help="skip the ids the output file already has results for")
    p.add_argument("--no-prefix-caching", action="store_true", help="offline: turn prefix caching off")
    engine = p.add_argument_group("offline engine flags (as `python -m engine.server`)")
    for name, kind, help_text in ENGINE_OPTIONS:
        if name in _SKIPPED_ENGINE_OPTIONS:
            continue
        if kind == "bool":   # --async-scheduling / --no-async-scheduling; unset keeps the engine's default
            engine.add_argument("--" + name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            engine.add_argument("--" + name, type=_ARG_TYPES[kind], help=help_text)
    args = p.parse_args(argv)
    args.engine_options = {name.replace("-", "_"): getattr(args, name.replace("-", "_"))
                           for name, _, _ in ENGINE_OPTIONS if name not in _SKIPPED_ENGINE_OPTIONS
                           and getattr(args, name.replace("-", "_")) is not None}
    if args.target and (args.engine_options or args.no_prefix_caching):
        given = ", ".join("--" + k.replace("_", "-") for k in args.engine_options) or "--no-prefix-caching"
        p.error(f"{given}: engine flags apply to the offline engine only; the --target server has its own")
    for name in ("max_concurrency", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed; it must be >= 1")
    args.engine_options["enable_prefix_caching"] = not args.no_prefix_caching
    return args


def _make_backend(args):
    if args.target:
        return ServerBackend(args.target, args.max_concurrency, args.timeout)
    return OfflineBackend(args.engine_options, args.batch_size)


def _summary(records: list[dict], skipped: int, seconds: float) -> str:
    ok = [r for r in records if "error" not in r]
    usage = lambda key: sum(r["usage"][key] for r in ok)
    return (f"batch_generate: {len(ok)} ok, {len(records) - len(ok)} failed, {skipped} skipped; "
            f"{usage('prompt_tokens')} prompt tokens ({usage('cached_prompt_tokens')} cached), "
            f"{usage('completion_tokens')} completion tokens; {seconds:.1f} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        items, errors = read_input(args.input)
        done = read_done(args.output) if args.resume else {}
        todo = [item for item in items if item.id not in done]
        backend = _make_backend(args) if todo else None
    except (OSError, ValueError) as e:  # unreadable input, a model the engine cannot load, a bad engine flag
        print(f"batch_generate: error: {e}", file=sys.stderr)
        return 1
    total = len(items) + len(errors)
    with open_output(args.output, args.resume) as f, \
            tqdm(total=total, desc="batch_generate", unit="req", file=sys.stderr) as bar:
        writer = OrderedWriter(f, bar)
        for index, record in errors.items():
            writer.emit(index, record)
        for item in items:
            if item.id in done:
                writer.emit(item.index, None)
        if backend is not None:
            backend.run(todo, writer.emit)
    if args.resume:  # the file may hold old records before the appended ones: put everything in order
        rewrite_in_order(args.output, items, errors, done, writer.records)
    else:
        fsync_dir(os.path.dirname(os.path.abspath(args.output)))  # the new file's directory entry
    print(_summary(writer.records, len(items) - len(todo), time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
