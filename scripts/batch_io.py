"""batch_generate's records: parsing and checking input lines, result/error records, the ordered writer.

Input lines: {"id", one of "prompt" | "messages" | "prompt_token_ids", optional sampling fields}. A line that
is not valid becomes an error record {"id" (or null), "line", "error"}; so does a request that fails later.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from engine import SamplingParams
from scripts.durable_io import fsync_dir

INPUTS = ("prompt", "messages", "prompt_token_ids")
_INPUT_FORMS = {"prompt": "string", "messages": "list of {role, content}", "prompt_token_ids": "list of ints"}
SAMPLING_TYPES = {"max_tokens": int, "temperature": (int, float), "top_p": (int, float), "top_k": int,
                  "seed": int, "stop": (str, list), "ignore_eos": bool}


@dataclass(frozen=True)
class Item:
    """One valid input line."""
    index: int                  # position among the input's non-blank lines = position in the output
    line: int                   # 1-based line number in the input file
    id: object
    kind: str                   # one of INPUTS
    value: object
    sampling: dict              # only the fields the line sets


def error_record(item_id, line: int, message: str) -> dict:
    return {"id": item_id, "line": line, "error": message}


def _check_sampling(obj: dict) -> dict:
    sampling = {k: obj[k] for k in SAMPLING_TYPES if k in obj}
    for key, value in sampling.items():
        if isinstance(value, bool) and key != "ignore_eos" or not isinstance(value, SAMPLING_TYPES[key]):
            raise ValueError(f"{key}={value!r} has the wrong type")
    if isinstance(sampling.get("stop"), list) and not all(isinstance(s, str) for s in sampling["stop"]):
        raise ValueError("stop must be a string or a list of strings")
    SamplingParams(**sampling)  # raises ValueError naming the field and what is allowed
    return sampling


def parse_line(text: str, index: int, line: int) -> Item:
    """The line as an Item; ValueError (with the id when the line has one) when it is malformed."""
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError("a line must be a JSON object")
    unknown = set(obj) - {"id", *INPUTS, *SAMPLING_TYPES}
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
    if "id" not in obj or not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        raise ValueError('every line needs an "id" (a string or an integer)')
    given = [k for k in INPUTS if k in obj]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(INPUTS)} (got {len(given)})")
    kind, value = given[0], obj[given[0]]
    ok = {"prompt": lambda v: isinstance(v, str) and v,
          "messages": lambda v: isinstance(v, list) and v and all(isinstance(m, dict) for m in v),
          "prompt_token_ids": lambda v: isinstance(v, list) and v and all(
              isinstance(t, int) and not isinstance(t, bool) for t in v)}[kind](value)
    if not ok:
        raise ValueError(f"{kind} must be a non-empty "
                         f"{_INPUT_FORMS[kind]}")
    return Item(index, line, obj["id"], kind, value, _check_sampling(obj))


def read_input(path: str) -> tuple[list[Item], dict[int, dict]]:
    """(valid items, {index: error record}) over the non-blank lines, indexed in input order."""
    items, errors, seen = [], {}, {}
    with open(path, encoding="utf-8") as f:
        lines = [(n, text) for n, text in enumerate(f, start=1) if text.strip()]
    for index, (n, text) in enumerate(lines):
        try:
            item = parse_line(text, index, n)
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            item_id = _id_or_none(text)
            errors[index] = error_record(item_id, n, f"line {n}: {e}")
            continue
        if item.id in seen:
            errors[index] = error_record(item.id, n,
                                         f"line {n}: duplicate id {item.id!r} (first on line {seen[item.id]})")
            continue
        seen[item.id] = n
        items.append(item)
    return items, errors


def _id_or_none(text: str):
    try:
        obj = json.loads(text)
        return obj.get("id") if isinstance(obj, dict) else None
    except ValueError:
        return None


def is_done(record) -> bool:
    """A record --resume keeps: a result that ran to its end. Error records and results cut off by a server
    shutdown or an engine fault (finish_reason "abort") are run again."""
    return (isinstance(record, dict) and "id" in record and "error" not in record
            and record.get("finish_reason") != "abort")


def read_done(path: str) -> dict[object, dict]:
    """The output file's finished records by id (for --resume; the last one of an id wins); a torn last
    line is ignored."""
    done = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for text in f:
                try:
                    record = json.loads(text)
                except ValueError:
                    continue
                if is_done(record):
                    done[record["id"]] = record
    return done


def open_output(path: str, resume: bool):
    """The output file for writing: truncated, or with --resume appended to (after ending a torn last line,
    so the first new record starts a line of its own)."""
    if not resume:
        return open(path, "w", encoding="utf-8")
    torn = False
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    f = open(path, "a", encoding="utf-8")
    if torn:
        f.write("\n")
    return f


def result_record(item_id, token_ids, text: str, finish_reason: str, prompt: int, cached: int) -> dict:
    return {"id": item_id, "text": text, "token_ids": list(token_ids), "finish_reason": finish_reason,
            "usage": {"prompt_tokens": prompt, "completion_tokens": len(token_ids), "cached_prompt_tokens": cached}}


class OrderedWriter:
    """Writes records in input order as soon as every earlier one is known; skipped indices are placeholders."""

    def __init__(self, f, bar):
        self._f, self._pending, self._next, self._bar = f, {}, 0, bar
        self.records: list[dict] = []

    def emit(self, index: int, record: dict | None) -> None:
        """Records index's result (None = skipped by --resume: nothing new to write)."""
        self._pending[index] = record
        while self._next in self._pending:
            record = self._pending.pop(self._next)
            if record is not None:
                self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.records.append(record)
            self._next += 1
        self._f.flush()  # a crash loses at most the records not yet in order; --resume picks up the rest
        os.fsync(self._f.fileno())
        self._bar.update(1)


def rewrite_in_order(path: str, items: list[Item], errors: dict, done: dict, new: list[dict]) -> None:
    """After --resume: the kept and new records, in input order (kept ids missing from the input go last)."""
    by_id = {r["id"]: r for r in new if "error" not in r}  # an "abort" result too: the latest outcome
    errors_by_line = {r["line"]: r for r in new if "error" in r}
    item_at = {item.index: item for item in items}
    lines = []
    for index in range(len(items) + len(errors)):
        item = item_at.get(index)
        if item is None:
            lines.append(errors[index])
        else:
            lines.append(done.get(item.id) or by_id.get(item.id) or errors_by_line[item.line])
    input_ids = {item.id for item in items}
    lines += [r for i, r in done.items() if i not in input_ids]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in lines)
        f.flush()
        os.fsync(f.fileno())  # the data first, so the rename can never expose an empty or partial file
    os.replace(tmp, path)  # atomic: a crash here leaves the old, still resumable file
    fsync_dir(os.path.dirname(os.path.abspath(path)))  # and the rename itself
