#!/usr/bin/env python3
"""Compatibility check: the official Anthropic Python SDK against a running llm-tower gateway.

    pip install anthropic==2.16.0
    python3 tests/sdk/anthropic_sdk_check.py http://127.0.0.1:8080 [API_KEY]

The gateway must run the demo config (examples/proxy/demo.toml; client key "sk-demo").
Checks a plain call, a streamed call (the SDK's event accumulator), a tool-use round trip,
count_tokens, and that errors surface as the SDK's typed exceptions (wrong key, unknown
model). Exits non-zero on the first failure.
"""

import sys

import anthropic
from anthropic import Anthropic


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
    client = Anthropic(base_url=base, api_key=key, max_retries=0, timeout=30)
    print(f"anthropic {anthropic.__version__} -> {base}")

    # 1. Plain call, with a system prompt in blocks (cache_control is accepted).
    msg = client.messages.create(
        model="gpt-4o-mini",
        max_tokens=200,
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "What is a tower layer?"}],
        extra_body={"temperature": 0},  # deterministic, so the cache keeps it
    )
    check(msg.type == "message" and msg.role == "assistant", "plain call is a message")
    text = "".join(b.text for b in msg.content if b.type == "text")
    check(text, f"plain call answered: {text[:60]!r}")
    check(msg.stop_reason == "end_turn", f"stop_reason is end_turn ({msg.stop_reason})")
    check(msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0, "plain call reports usage")

    # 2. The same again through the raw response: the gateway's headers, a cache hit.
    raw = client.messages.with_raw_response.create(
        model="gpt-4o-mini",
        max_tokens=200,
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "What is a tower layer?"}],
        extra_body={"temperature": 0},  # deterministic, so the cache keeps it
    )
    check(raw.headers.get("x-llm-cache") == "hit", f"second identical call is a cache hit ({raw.headers.get('x-llm-cache')})")
    again = raw.parse()
    check("".join(b.text for b in again.content if b.type == "text") == text, "the hit has the same answer")

    # 3. Streamed call: every event type the SDK knows, accumulated into the final message.
    kinds = []
    with client.messages.stream(
        model="gpt-4o",
        max_tokens=300,
        messages=[{"role": "user", "content": "Explain streaming in one sentence."}],
    ) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_message()
    streamed = "".join(b.text for b in final.content if b.type == "text")
    check(kinds[0] == "message_start", f"stream starts with message_start ({kinds[:2]})")
    for k in ("content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"):
        check(k in kinds, f"stream has {k}")
    check(kinds.count("text") > 1 or kinds.count("content_block_delta") > 1, f"stream arrived in pieces: {streamed[:60]!r}")
    check(final.stop_reason == "end_turn", "streamed stop_reason is end_turn")
    check(final.usage.output_tokens > 0, "stream ends with usage")

    # 4. Tools: the model calls one; its result goes back; the model answers in text.
    tools = [{
        "name": "get_weather",
        "description": "Weather of a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.messages.create(model="gpt-4o-mini", max_tokens=200, tools=tools, messages=ask)
    uses = [b for b in first.content if b.type == "tool_use"]
    check(first.stop_reason == "tool_use" and len(uses) == 1, f"the model calls a tool ({first.stop_reason})")
    check(uses[0].name == "get_weather" and isinstance(uses[0].input.get("city"), str), f"tool input {uses[0].input}")
    follow = ask + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 C, sunny"}]},
    ]
    second = client.messages.create(model="gpt-4o-mini", max_tokens=200, tools=tools, messages=follow)
    check(second.stop_reason == "end_turn" and second.content[0].type == "text", "after the tool result, a text answer")
    # The same, streamed: the tool call arrives as input_json_delta and is assembled.
    with client.messages.stream(model="gpt-4o-mini", max_tokens=200, tools=tools, messages=ask) as stream:
        final = stream.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    check(len(uses) == 1 and isinstance(uses[0].input.get("city"), str), f"streamed tool input {uses and uses[0].input}")

    # 5. count_tokens.
    counted = client.messages.count_tokens(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Count the tokens of this sentence, please."}],
    )
    check(counted.input_tokens > 0, f"count_tokens: {counted.input_tokens}")

    # 6. Errors are the SDK's typed exceptions, with Anthropic's error body.
    bad = Anthropic(base_url=base, api_key="sk-wrong", max_retries=0, timeout=30)
    try:
        bad.messages.create(model="gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        check(False, "a wrong key is rejected")
    except anthropic.AuthenticationError as e:
        check(e.status_code == 401, "a wrong key raises AuthenticationError (401)")
        check(e.body["error"]["type"] == "authentication_error", f"error body {e.body}")
    try:
        client.messages.create(model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        check(False, "an unknown model is rejected")
    except anthropic.NotFoundError as e:
        check(e.body["error"]["type"] == "not_found_error", "an unknown model raises NotFoundError (404)")
    try:
        client.messages.create(model="gpt-4o-mini", max_tokens=10, messages=[{"role": "system", "content": "hi"}])
        check(False, "a bad role is rejected")
    except anthropic.BadRequestError as e:
        check("role" in e.body["error"]["message"], f"a bad request names the field: {e.body['error']['message']}")

    print("all Anthropic SDK checks passed")


if __name__ == "__main__":
    main()
