"""The benchmark's OpenAI backend: one streamed POST /v1/completions per request, against any
OpenAI-compatible server (ours, vLLM, SGLang, MAX, llama.cpp's), with the standard library's http.client.

Prompts go as text (the workload's token ids decoded: any server) or, with `prompt_format="tokens"`, as
token ids (exact lengths; servers that accept them, such as ours and vLLM). TTFT = the first chunk carrying
text (or token ids); ITL = the gaps between such chunks (shared by the tokens of a chunk when the server
says how many); output and cached tokens come from the final `usage` chunk (`stream_options.
include_usage`) when the server sends one, else the output is counted in chunks. The extensions
(`ignore_eos`, `cache_salt`, `return_token_ids`, as in vLLM) go only to servers that accept them: ours, or
with `extensions=True`; `extra_body` adds fields of the server's own (e.g. llama.cpp's `min_tokens`, its
stand-in for ignore_eos). With token ids returned, a multi-turn history holds exactly the tokens generated;
otherwise the answer's text, re-tokenized.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse

from scripts.bench_report import RequestResult
from scripts.bench_server import ServerInfo

OUR_OWNER = "jax-paged-engine"   # engine/serving/http_server.py's /v1/models owned_by


class OpenAIBackend:
    name = "openai"

    def __init__(self, url: str, tokenizer, timeout: float, prompt_format: str = "text",
                 extensions: bool | None = None, extra_body: dict | None = None):
        parsed = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"--target={url!r} is not allowed; the openai backend wants http://HOST:PORT")
        self.url = f"http://{parsed.netloc}"
        self._host, self._port = parsed.hostname, parsed.port or 80
        self._tokenizer, self._timeout, self._format = tokenizer, timeout, prompt_format
        self._extensions, self._extra_body, self._model = extensions, dict(extra_body or {}), None
        self._local = threading.local()   # one keep-alive connection per client thread
        self._lock, self._connections = threading.Lock(), []
        self.metrics_url: str | None = None

    # -- server info -----------------------------------------------------------------------------------
    def info(self) -> ServerInfo:
        status, body = self._request("GET", "/v1/models", None)
        if status != 200:
            raise ValueError(f"{self.url}/v1/models answered HTTP {status}: {body[:200]!r}")
        card = json.loads(body)["data"][0]
        ours = card.get("owned_by") == OUR_OWNER
        self._model = card["id"]
        if self._extensions is None:
            self._extensions = ours
        if ours:
            self.metrics_url = self.url + "/metrics"   # the same registry as --metrics-port
        return ServerInfo(card["id"], card.get("max_model_len"), card.get("prefix_caching"), ours)

    # -- one request ----------------------------------------------------------------------------------
    def _payload(self, prompt: list[int], output_len: int, salt: str) -> dict:
        if self._format == "tokens":
            sent = prompt
        else:  # the server adds BOS itself where its tokenizer says so
            bos, adds_bos = (getattr(self._tokenizer, a, None) for a in ("bos_token_id", "add_bos_token"))
            ids = prompt[1:] if prompt and adds_bos and prompt[0] == bos else prompt
            sent = self._tokenizer.decode(ids, skip_special_tokens=False)
        payload = {"model": self._model, "prompt": sent, "max_tokens": output_len, "temperature": 0.0,
                   "stream": True, "stream_options": {"include_usage": True}}
        if self._extensions:
            payload.update(ignore_eos=True, cache_salt=salt, return_token_ids=True)
        return {**payload, **self._extra_body}

    def send(self, prompt: list[int], output_len: int, salt: str) -> tuple[RequestResult, list[int]]:
        """One streamed completion; returns its timings and the answer as token ids."""
        result = RequestResult(ok=False, prompt_len=len(prompt))
        body = json.dumps(self._payload(prompt, output_len, salt)).encode()
        start = time.perf_counter()
        try:
            text, ids, usage, reason = self._stream(body, result, start)
        except (OSError, http.client.HTTPException, ValueError) as e:
            self._local.conn = None
            result.error = result.error or f"{type(e).__name__}: {e}"
            return result, []
        result.e2e = time.perf_counter() - start
        answer = ids if ids is not None else self._tokenizer.encode(text, add_special_tokens=False)
        counted = len(ids) if ids is not None else (1 + len(result.itls) if result.ttft else 0)
        result.output_len = usage.get("completion_tokens", counted)
        result.prompt_len = usage.get("prompt_tokens", result.prompt_len)
        result.cached_prompt_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        result.ok = reason in ("stop", "length") and result.ttft is not None
        result.error = "" if result.ok else f"finished with {reason} after {result.output_len} tokens"
        return result, answer

    def _stream(self, body: bytes, result: RequestResult, start: float):
        """Reads the SSE stream: (text, token ids or None, usage, finish_reason); fills TTFT and ITLs."""
        response = self._post_stream(body)
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}: {_error_message(response.read())}")
        text, ids, usage, reason, previous = [], None, {}, None, start
        for line in response:
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                result.error = f"stream error: {event['error'].get('message')}"
                raise ValueError(result.error)
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                reason = choice.get("finish_reason") or reason
                new_ids = choice.get("token_ids")
                if new_ids is not None:
                    ids = (ids or []) + list(new_ids)
                n = len(new_ids) if new_ids is not None else int(bool(choice.get("text")))
                if n:
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itls.extend([(now - previous) / n] * n)
                    previous = now
                text.append(choice.get("text") or "")
        return "".join(text), ids, usage, reason

    # -- connections ----------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        if getattr(self._local, "conn", None) is None:
            self._local.conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            with self._lock:
                self._connections.append(self._local.conn)
        return self._local.conn

    def _post_stream(self, body: bytes) -> http.client.HTTPResponse:
        try:
            return self._post(body)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            self._local.conn = None   # a kept-alive connection the server has closed since: once more, fresh
            return self._post(body)

    def _post(self, body: bytes) -> http.client.HTTPResponse:
        conn = self._connection()
        conn.request("POST", "/v1/completions", body=body,
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        return conn.getresponse()

    def _request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=30)
        try:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


def _error_message(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")
