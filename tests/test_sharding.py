"""Tensor parallelism over a 'model' mesh axis: the layout rules in-process, and whole engines sharded over
2 and 4 CPU devices in one subprocess (tests/sharding_driver.py; XLA_FLAGS must be set before jax starts)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from engine.config import ModelConfig
from engine.device.distributed import check, maybe_initialize
from engine.loading.gguf_loader import load_gguf
from engine.device.sharding import Layout, param_shapes, sharding_rules
from tests.tiny_model import TinySpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TP_SPEC = TinySpec(heads=8, kv_heads=4, head_dim=16, hidden=128)    # 8 query / 4 KV heads: divide 2 and 4
KV2_SPEC = TinySpec(heads=8, kv_heads=2, head_dim=16, hidden=128)   # KV heads do not divide 4 devices
SMOLLM2 = ModelConfig(architecture="llama", name="smollm2", vocab_size=49152, hidden_size=576,
                      intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                      rope_theta=1e5, rms_norm_eps=1e-5, max_position=8192, tie_word_embeddings=True)


# --- rules (no devices needed) ---
def test_rules_split_heads_mlp_and_vocab_when_they_divide():
    assert sharding_rules(SMOLLM2, 3) == {"q_heads": "model", "kv_heads": "model", "kv_head": "model",
                                          "mlp": "model", "vocab": "model"}


def test_rules_replicate_kv_when_only_kv_heads_do_not_divide():
    import dataclasses
    rules = sharding_rules(dataclasses.replace(SMOLLM2, num_heads=12, num_kv_heads=3), 4)
    assert rules["q_heads"] == "model" and rules["kv_heads"] is None and rules["kv_head"] is None


def test_non_dividing_heads_is_a_clear_error():
    with pytest.raises(ValueError, match=r"num_heads=9 \(num_kv_heads=3\) must be divisible by the device "
                                         r"count 2"):
        sharding_rules(SMOLLM2, 2)


def test_weights_description_matches_the_loader(tiny_gguf_factory):
    config, params, _ = load_gguf(tiny_gguf_factory(TP_SPEC))
    want = param_shapes(config)
    assert {k: v.shape for k, v in params["layers"].items()} == want["layers"]
    assert (params["embed"].shape, params["lm_head"].shape, params["final_norm"].shape) == \
        (want["embed"], want["lm_head"], want["final_norm"])


def test_single_device_layout_keeps_whole_arrays(tiny_gguf_factory):
    import jax
    config, params, _ = load_gguf(tiny_gguf_factory(TP_SPEC))
    layout = Layout.build(config, jax.devices("cpu")[:1])
    placed = layout.put_params(params, jax.numpy.float32)
    wq = placed["layers"]["wq"]
    assert [s.data.shape for s in wq.addressable_shards] == [params["layers"]["wq"].shape]
    from engine.device.device_params import FusedShapes, to_device_params
    fused = to_device_params(params, layout, FusedShapes.for_layout(layout), jax.numpy.float32)
    d, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    assert [s.data.shape for s in fused["layers"][0]["wqkv"].addressable_shards] == [(d, q + 2 * kv)]


@pytest.mark.parametrize("args,message", [
    (("h:1", None, 0), "--num-processes must be set too"),
    ((None, 2, None), "--coordinator-address, --process-id must be set too"),
    (("nohost", 2, 0), "--coordinator-address=nohost is not allowed; use host:port"),
    (("h:70000", 2, 0), "--coordinator-address=h:70000 is not allowed"),
    (("h:1", 0, 0), "--num-processes=0 is not allowed; it must be >= 1"),
    (("h:1", 2, 2), r"--process-id=2 is not allowed; it must be in \[0, 1\] for --num-processes=2"),
])
def test_distributed_flags_are_validated(args, message):
    with pytest.raises(ValueError, match=message):
        check(*args)


def test_distributed_is_off_by_default_and_too_late_once_jax_started():
    assert check(None, None, None) is False and maybe_initialize(None, None, None) is False
    import jax
    jax.devices()              # this process's runtime is already fixed
    with pytest.raises(ValueError, match="it must be set up before JAX uses any device"):
        maybe_initialize("127.0.0.1:1", 2, 1)


# --- several CPU devices, in a subprocess ---
def run_driver(tmp, jobs: list) -> list:
    """Runs tests/sharding_driver.py on `jobs` with 4 CPU devices; returns its results."""
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.sharding_driver", str(tmp / "jobs.json"),
                           str(tmp / "out.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def sharded_runs(tiny_gguf_factory, tmp_path_factory):
    """Runs every multi-device job in one subprocess; returns {name: result}."""
    from engine.loading.checkpoint import convert_gguf
    tmp = tmp_path_factory.mktemp("sharding")
    tp, kv2, h6 = (tiny_gguf_factory(s) for s in (TP_SPEC, KV2_SPEC, TinySpec()))
    ckpt = str(tmp / "ckpt")
    convert_gguf(tp, ckpt, "float32")
    with socket.socket() as sock:          # a free port for the one-process jax.distributed coordinator
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    jobs = {"distributed": ["initialize", f"127.0.0.1:{port}"], "tp1": ["generate", tp, "cpu:0"],
            "tp2": ["generate", tp, "cpu:0,1"],
            "tp4": ["generate", tp, "cpu:0,1,2,3"], "kv2_1": ["generate", kv2, "cpu:0"],
            "kv2_4": ["generate", kv2, "cpu:0,1,2,3"], "heads6_4": ["error", h6, "cpu:0,1,2,3"],
            "restore2": ["restore", ckpt, "cpu:0,1"], "tp2_pallas": ["generate", tp, "cpu:0,1", "pallas"],
            "q8_1": ["generate", tp, "cpu:0", "reference", "q8_0"],
            "q8_2": ["generate", tp, "cpu:0,1", "reference", "q8_0"]}
    return dict(zip(jobs, run_driver(tmp, list(jobs.values()))))


@pytest.mark.parametrize("run", ["tp2", "tp4"])
def test_sharded_greedy_tokens_equal_single_device(sharded_runs, run):
    one, many = sharded_runs["tp1"], sharded_runs[run]
    assert many["devices"] == {"tp2": "cpu:0,1", "tp4": "cpu:0,1,2,3"}[run]
    assert many["tokens"] == one["tokens"]
    assert many["again"] == one["tokens"]            # the second round reuses cached prefix pages
    assert many["cached"] == [32, 32, 32]            # two full 16-token pages of the shared 37-token prefix


def test_pallas_attention_under_shard_map_equals_single_device(sharded_runs):
    """The Pallas kernel (interpret mode here) runs per device on its own heads via shard_map."""
    one, many = sharded_runs["tp1"], sharded_runs["tp2_pallas"]
    assert many["tokens"] == one["tokens"] and many["again"] == one["tokens"]
    assert many["k_cache"]["spec"][2] == "model"


@pytest.mark.parametrize("run,n", [("tp2", 2), ("tp4", 4)])
def test_params_and_kv_pages_are_really_sharded(sharded_runs, run, n):
    r = sharded_runs[run]          # TP_SPEC: L=2, d=128, 8 heads x 16, 4 KV heads, F=256; vocab 331
    assert r["num_layers"] == 2    # per-layer arrays (engine/device/device_params.py); layer 1 is described
    # Fused Q|K|V columns: each device holds its 8/n query heads and 4/n KV heads (128 + 64 + 64 columns).
    assert r["wqkv"] == {"spec": [None, "model"], "shards": [[128, 256 // n]], "num_shards": n}
    assert r["wo"] == {"spec": ["model", None], "shards": [[128 // n, 128]], "num_shards": n}
    assert r["w_gate_up"]["shards"] == [[128, 512 // n]] and r["w_down"]["shards"] == [[256 // n, 128]]
    assert r["attn_norm"] == {"spec": [], "shards": [[128]], "num_shards": n}
    assert r["embed"]["spec"] == [None, None]        # 331 does not divide: replicated
    for cache in ("k_cache", "v_cache"):
        assert r[cache] == {"spec": [None, None, "model", None], "shards": [[48, 16, 4 // n, 16]],
                            "num_shards": n}


def test_q8_0_shards_int8_weights_with_their_scales_and_matches_one_device(sharded_runs):
    one, two = sharded_runs["q8_1"], sharded_runs["q8_2"]
    assert two["tokens"] == one["tokens"] and two["again"] == one["tokens"]
    assert two["wqkv"]["shards"] == [[128, 128]] and two["wqkv_scale"] == {"spec": ["model"], "shards": [[128]],
                                                                           "num_shards": 2}
    # wo on the device is int8 [out, in] (engine/device/quantization.py Int8Rows): sharded along its input features
    assert two["wo"]["spec"] == [None, "model"] and two["wo_scale"] == {"spec": [None], "shards": [[128]],
                                                                        "num_shards": 2}


def test_kv_heads_not_dividing_replicates_kv_and_still_matches(sharded_runs):
    one, four = sharded_runs["kv2_1"], sharded_runs["kv2_4"]
    assert four["tokens"] == one["tokens"] and four["again"] == one["tokens"]
    assert four["wq"]["shards"] == [[128, 32]]                          # query heads still split 4 ways
    assert four["wkv"] == {"spec": [], "shards": [[128, 64]], "num_shards": 4}   # K|V fused, replicated
    assert four["k_cache"]["spec"] == [None] * 4 and four["k_cache"]["shards"] == [[48, 16, 2, 16]]


def test_non_dividing_heads_fail_with_the_counts(sharded_runs):
    assert sharded_runs["heads6_4"]["error"] == (
        "cannot shard the model over 4 devices: num_heads=6 (num_kv_heads=2) must be divisible by the device "
        "count 4; pick --devices with a count that divides 6")


def test_one_process_distributed_runtime_starts(sharded_runs):
    """The other jobs then ran inside it (the mesh code does not assume a plain single-process runtime)."""
    assert sharded_runs["distributed"] == {"initialized": True, "process_count": 1, "process_index": 0,
                                           "devices": 4}


def test_checkpoint_restores_straight_onto_shards(sharded_runs):
    r = sharded_runs["restore2"]
    assert r["wq"] == {"spec": [None, None, "model"], "shards": [[2, 128, 64]], "num_shards": 2}
    assert r["w_down"] == {"spec": [None, "model", None], "shards": [[2, 128, 128]], "num_shards": 2}
    assert r["final_norm"] == {"spec": [None], "shards": [[128]], "num_shards": 2}


@pytest.mark.slow
def test_smollm2_over_three_devices_answers_as_on_one(tmp_path):
    """The real model, 9 query / 3 KV heads, vocab 49152 and FFN 1536 all split 3 ways (FACTS.md's answer)."""
    from engine.loading.gguf_loader import default_model_path
    r = run_driver(tmp_path, [["chat", default_model_path(), "cpu:0,1,2"]])[0]
    assert (r["text"], r["finish_reason"]) == ("The capital of France is Paris.", "stop")
    assert r["k_cache"]["spec"] == [None, None, "model", None] and r["k_cache"]["num_shards"] == 3
