"""/v1/embeddings with the official openai SDK: the reference plugin's deterministic vectors,
and real ones from SmolLM2 served by llama-server in embedding mode."""
import math

import openai
import pytest

from conftest import LLAMA_TIMEOUT, SMOLLM2, needs_llama
from test_llama_server import llama  # noqa: F401 - the shared SmolLM2 host fixture


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_float_and_base64(server, openai_client):
    server.load("ref")
    # The SDK asks for base64 by default and decodes it.
    default = openai_client.embeddings.create(model="ref", input=["hello world", "goodbye"])
    assert [d.index for d in default.data] == [0, 1]
    assert len(default.data[0].embedding) == 8
    assert abs(sum(x * x for x in default.data[0].embedding) - 1) < 1e-5
    floats = openai_client.embeddings.create(model="ref", input="hello world", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(default.data[0].embedding, abs=1e-6)
    assert floats.usage.prompt_tokens == 2


def test_embeddings_bad_input(server):
    server.load("ref")
    for body, param in [({"model": "ref"}, "input"), ({"model": "ref", "input": ""}, "input"),
                        ({"model": "ref", "input": [1, 2]}, "input[0]"),
                        ({"model": "ref", "input": "x", "encoding_format": "hex"}, "encoding_format"),
                        ({"model": "ref", "input": "x", "dimensions": 4}, "dimensions")]:
        status, answer = server.post("/v1/embeddings", body)
        assert status == 400, (body, answer)
        assert answer["error"]["param"] == param, (body, answer)


@needs_llama
@LLAMA_TIMEOUT
def test_smollm2_embeddings_through_llama_server(llama):
    client = llama.openai(timeout=120)
    # A chat model does not embed: a clear 400, not an engine error.
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="default", input="hello")
    assert "does not support embeddings" in str(refused.value)

    status, body = llama.post("/api/inference/load", {"model_path": SMOLLM2, "alias": "smol-embed", "embedding": True})
    assert status == 200, body
    try:
        assert body["capabilities"] == ["embeddings", "tokenize"]
        result = client.embeddings.create(model="smol-embed", input=[
            "The cat sat on the mat.", "A cat was sitting on the mat.", "Quarterly revenue grew by four percent."])
        vectors = [d.embedding for d in result.data]
        assert len(vectors[0]) == 576  # SmolLM2-135M's hidden size
        assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
        assert result.usage.prompt_tokens > 15
        status, answer = llama.post("/v1/chat/completions", {"model": "smol-embed", "messages": [{"role": "user", "content": "Hi"}]})
        assert status == 400 and "does not support chat" in answer["error"]["message"]
    finally:
        llama.post("/api/inference/unload", {"model_path": "smol-embed", "force_cancel_active": True})
