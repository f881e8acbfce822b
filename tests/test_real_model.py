"""The embedded SmolLM2-135M-Instruct (slow: loads the real 98 MB GGUF and compiles for it)."""
import pytest

from engine import LLM, SamplingParams

pytestmark = pytest.mark.slow
OPTS = dict(max_batch_size=2, max_length=256, max_num_batched_tokens=64, kv_cache_pages=8)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_capital_of_france(dtype):
    llm = LLM(quantization_encoding=dtype, **OPTS)
    out = llm.generate(QUESTION, SamplingParams(max_tokens=24))[0]
    assert "Paris" in out.text, out.text
    assert out.finish_reason == "stop"            # the model ends its turn with <|im_end|>
    assert llm.engine.model_config.num_layers == 30 and llm.engine.model_config.vocab_size == 49152
