#!/usr/bin/env python3
"""Compatibility check: the official OpenAI Python SDK against a running llm-tower gateway.

    pip install openai==3.57.0
    python3 tests/sdk/openai_sdk_check.py http://127.0.0.1:8080 [API_KEY]

The gateway must run the demo config (examples/proxy/demo.toml; client key "sk-demo").
Checks a plain call, a streamed call, the gateway's headers through the SDK's raw
response, a cache hit, that an error surfaces as the SDK's typed exception,
embeddings (float, base64, a half-cached batch), and the Responses API (plain,
streamed, a function-call round trip with previous_response_id, its input items,
retrieve, delete).
Exits non-zero on the first failure.
"""

import base64
import struct
import sys

import openai
from openai import OpenAI


def check(cond, msg):
    if not cond:
        print(f"FAIL: {msg}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {msg}")


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    base = sys.argv[1].rstrip("/")
    key = sys.argv[2] if len(sys.argv) > 2 else "sk-demo"
    client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=30)
    print(f"openai {openai.__version__} -> {base}")

    # 1. Plain call.
    resp = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "What is a tower layer?"}],
        temperature=0,
    )
    text = resp.choices[0].message.content
    check(isinstance(text, str) and text, f"plain call answered: {text[:60]!r}")
    check(resp.usage is not None and resp.usage.total_tokens > 0, "plain call reports usage")
    check(resp.choices[0].finish_reason == "stop", "finish_reason is stop")

    # 2. Same request again, through the raw response to read the gateway's headers.
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "What is a tower layer?"}],
        temperature=0,
    )
    check(raw.headers.get("x-llm-cache") == "hit", f"second identical call is a cache hit ({raw.headers.get('x-llm-cache')})")
    check(raw.parse().choices[0].message.content == text, "the hit has the same answer")

    # 3. Streamed call.
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Explain streaming in one sentence."}],
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
    streamed = "".join(parts)
    check(len(parts) > 1, f"stream arrived in {len(parts)} chunks: {streamed[:60]!r}")
    check(usage is not None and usage.total_tokens > 0, "stream ends with usage")

    # 4. Errors are the SDK's typed exceptions.
    bad = OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    try:
        bad.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        check(False, "a wrong key is rejected")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, "a wrong key raises AuthenticationError (401)")
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=[])
        check(False, "empty messages are rejected")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "empty messages raise BadRequestError (400)")

    # 5. Models list.
    ids = [m.id for m in client.models.list()]
    check("gpt-4o-mini" in ids, f"models list has the aliases ({len(ids)} models)")
    # 6. Embeddings: the SDK's default (it asks for base64 and decodes), float, base64.
    emb_model = "text-embedding-3-small"
    texts = ["a tower layer", "a fallback chain"]
    default = client.embeddings.create(model=emb_model, input=texts, dimensions=8)
    vecs = [d.embedding for d in default.data]
    check(len(vecs) == 2 and all(len(v) == 8 for v in vecs), "embeddings: two vectors of 8 dimensions")
    check([d.index for d in default.data] == [0, 1], "embeddings: in input order")
    check(default.usage.prompt_tokens > 0, "embeddings report prompt tokens")
    floats = client.embeddings.with_raw_response.create(
        model=emb_model, input=texts, dimensions=8, encoding_format="float"
    )
    check(floats.headers.get("x-llm-cache") == "hit", "the same inputs are a cache hit in another encoding")
    fl = [d.embedding for d in floats.parse().data]
    check(
        all(abs(x - y) < 1e-6 for a, b in zip(fl, vecs) for x, y in zip(a, b)),
        "float and base64 encodings carry the same vectors",
    )
    b64 = client.embeddings.create(model=emb_model, input=texts[1], dimensions=8, encoding_format="base64")
    raw_b64 = b64.data[0].embedding
    check(isinstance(raw_b64, str), "explicit base64 stays a string")
    decoded = list(struct.unpack("<8f", base64.b64decode(raw_b64)))
    check(decoded == vecs[1], "base64 decodes to the exact f32 vector")
    half = client.embeddings.with_raw_response.create(
        model=emb_model, input=["a new input", texts[0]], dimensions=8
    )
    got = [d.embedding for d in half.parse().data]
    check(got[1] == vecs[0], "a half-cached batch is put back together in order")
    check(half.headers.get("x-llm-cache") == "miss", "a half-cached batch asks upstream (miss)")
    try:
        client.embeddings.create(model=emb_model, input=[])
        check(False, "empty embeddings input is rejected")
    except openai.BadRequestError as e:
        check(e.status_code == 400, "empty embeddings input raises BadRequestError (400)")

    responses_checks(client)
    print("all OpenAI SDK checks passed")


def responses_checks(client):
    # 7. Responses: plain.
    r = client.responses.create(model="gpt-4o-mini", input="What is a tower layer?", instructions="Be brief.")
    check(r.object == "response" and r.status == "completed", f"responses.create answered ({r.status})")
    check(isinstance(r.output_text, str) and r.output_text, f"output_text: {r.output_text[:60]!r}")
    check(r.usage is not None and r.usage.total_tokens > 0, "a response reports usage")
    check(r.instructions == "Be brief.", "instructions are echoed")

    # 8. Responses: streamed, typed events with sequence numbers.
    kinds, parts, seqs, final = [], [], [], None
    with client.responses.stream(model="gpt-4o", input="Explain streaming in one sentence.") as stream:
        for event in stream:
            kinds.append(event.type)
            seqs.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                parts.append(event.delta)
        final = stream.get_final_response()
    check(kinds[0] == "response.created" and kinds[-1] == "response.completed", "stream starts created, ends completed")
    check(len(parts) > 1, f"text arrived in {len(parts)} deltas")
    check(seqs == list(range(len(seqs))), "sequence numbers count from 0")
    check(final.output_text == "".join(parts), "the final response has the streamed text")
    streamed = client.responses.create(model="gpt-4o", input="Say hi.", stream=True)
    check(any(e.type == "response.output_text.delta" for e in streamed), "responses.create(stream=True) iterates events")

    # 9. A function-call round trip with previous_response_id.
    tools = [{
        "type": "function",
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }]
    first = client.responses.create(model="gpt-4o-mini", input="Weather in Paris?", tools=tools)
    calls = [o for o in first.output if o.type == "function_call"]
    check(len(calls) == 1 and calls[0].name == "get_weather", "the model calls the function")
    second = client.responses.create(
        model="gpt-4o-mini",
        previous_response_id=first.id,
        tools=tools,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp_c": 21}'}],
    )
    check(second.previous_response_id == first.id, "the answer names its previous response")
    check(second.output_text, f"the function output is answered: {second.output_text[:60]!r}")

    # 10. Retrieve and delete.
    got = client.responses.retrieve(second.id)
    check(got.id == second.id and got.output_text == second.output_text, "responses.retrieve returns it")
    items = list(client.responses.input_items.list(second.id, order="asc", limit=2))
    check(
        len(items) >= 3
        and items[0].type == "message"
        and items[-1].type == "function_call_output"
        and len({i.id for i in items}) == len(items),
        f"responses.input_items.list pages through the conversation ({len(items)} items)",
    )
    client.responses.delete(second.id)
    try:
        client.responses.retrieve(second.id)
        check(False, "a deleted response is gone")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "a deleted response is gone (404)")
    try:
        client.responses.create(model="gpt-4o-mini", previous_response_id="resp_unknown", input="x")
        check(False, "an unknown previous_response_id is rejected")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "an unknown previous_response_id raises NotFoundError (404)")


if __name__ == "__main__":
    main()
