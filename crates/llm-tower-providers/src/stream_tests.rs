//! Chunk-level properties of the SSE → chunk pipeline of both providers: any split of the
//! body gives the same chunks, and any truncation before the terminal event is an error.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body::Frame;
use http_body_util::StreamBody;
use llm_tower_core::{ChatChunk, ErrorKind, LlmError};
use proptest::prelude::*;

use crate::anthropic::translate::AnthropicDecoder;
use crate::common::{Decoder, SseStream};
use crate::openai::OpenAiDecoder;

const OPENAI: &[u8] = b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n\
: keep-alive\n\n\
data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}],\"usage\":null}\r\n\r\n\
data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo \xe2\x9c\x93\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"total_tokens\":12}}\n\n\
data: [DONE]\n\n";

const ANTHROPIC: &[u8] = b"event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1,\"cache_read_input_tokens\":20}}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\n\
event: content_block_delta\r\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\r\n\r\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"! \xc3\xa9\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

fn openai() -> OpenAiDecoder {
    OpenAiDecoder {
        provider: Arc::from("openai"),
        key: None,
        done: false,
    }
}

fn anthropic() -> AnthropicDecoder {
    AnthropicDecoder::new(Arc::from("anthropic"), None, "m".into())
}

/// Runs the stream over `parts` (one body frame each).
fn run<D: Decoder>(parts: Vec<Bytes>, decoder: D) -> (Vec<ChatChunk>, Option<LlmError>) {
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> =
        parts.into_iter().map(|b| Ok(Frame::data(b))).collect();
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let mut stream = SseStream::new(body, decoder, Arc::from("p"), 1 << 20);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut out = Vec::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(c) => out.push(c.into_chunk().unwrap()),
                Err(e) => {
                    assert!(stream.next().await.is_none());
                    return (out, Some(e));
                }
            }
        }
        (out, None)
    })
}

fn split(data: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut prev = 0;
    for c in cuts {
        out.push(Bytes::copy_from_slice(&data[prev..c]));
        prev = c;
    }
    out.push(Bytes::copy_from_slice(&data[prev..]));
    out
}

/// Created timestamps are per-stream for Anthropic; compare everything else.
fn normalized(mut chunks: Vec<ChatChunk>) -> Vec<ChatChunk> {
    for c in &mut chunks {
        c.created = 0;
    }
    chunks
}

#[test]
fn whole_streams_decode() {
    let (chunks, err) = run(vec![Bytes::from_static(OPENAI)], openai());
    assert!(err.is_none());
    assert_eq!(chunks.len(), 5);
    assert_eq!(chunks.last().unwrap().usage().unwrap().total_tokens, 12);

    let (chunks, err) = run(vec![Bytes::from_static(ANTHROPIC)], anthropic());
    assert!(err.is_none(), "{err:?}");
    let text: String = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|c| c.delta.text())
        .collect();
    assert_eq!(text, "Hello! é");
    let u = chunks.last().unwrap().usage().unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.cached_tokens()),
        (45, 15, 20)
    );
}

#[test]
fn every_truncation_before_the_terminal_event_is_an_error() {
    for (data, terminal) in [
        (OPENAI, &b"data: [DONE]"[..]),
        (ANTHROPIC, &b"data: {\"type\":\"message_stop\"}"[..]),
    ] {
        let end = memchr::memmem::rfind(data, terminal).unwrap() + terminal.len();
        for cut in 0..end {
            let parts = vec![Bytes::copy_from_slice(&data[..cut])];
            let (_, err) = if data == OPENAI {
                run(parts, openai())
            } else {
                run(parts, anthropic())
            };
            let err = err.unwrap_or_else(|| panic!("a stream cut at {cut} ended cleanly"));
            assert_eq!(err.kind(), ErrorKind::Transport, "cut at {cut}: {err}");
        }
        // Cut right after the terminal event's data line: still complete.
        let parts = vec![Bytes::copy_from_slice(&data[..end])];
        let (_, err) = if data == OPENAI {
            run(parts, openai())
        } else {
            run(parts, anthropic())
        };
        assert!(err.is_none());
    }
}

#[test]
fn body_error_mid_stream_is_transport() {
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
        Ok(Frame::data(Bytes::from_static(&OPENAI[..300]))),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset by peer",
        )),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let mut stream = SseStream::new(body, openai(), Arc::from("openai"), 1 << 20);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let items: Vec<_> = rt.block_on(async { (&mut stream).collect::<Vec<_>>().await });
    let err = items.last().unwrap().as_ref().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transport);
    assert!(err.message().contains("reset by peer"), "{err}");
}

proptest! {
    #[test]
    fn openai_any_chunking_same_chunks(cuts in proptest::collection::vec(any::<usize>(), 0..30)) {
        let whole = run(vec![Bytes::from_static(OPENAI)], openai());
        let parts = run(split(OPENAI, &cuts), openai());
        prop_assert!(parts.1.is_none());
        prop_assert_eq!(parts.0, whole.0);
    }

    #[test]
    fn anthropic_any_chunking_same_chunks(cuts in proptest::collection::vec(any::<usize>(), 0..30)) {
        let whole = run(vec![Bytes::from_static(ANTHROPIC)], anthropic());
        let parts = run(split(ANTHROPIC, &cuts), anthropic());
        prop_assert!(parts.1.is_none());
        prop_assert_eq!(normalized(parts.0), normalized(whole.0));
    }
}

#[test]
fn hostile_anthropic_numbers_are_bounded() {
    let start = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":18446744073709551615,\"cache_read_input_tokens\":18446744073709551615,\"cache_creation_input_tokens\":-3}}}\n\n";
    // A block index that would size a table of 10^12 entries.
    let mut body = start.to_vec();
    body.extend_from_slice(b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1000000000000,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n");
    let (_, err) = run(vec![Bytes::from(body)], anthropic());
    let err = err.expect("malformed");
    assert_eq!(err.kind(), ErrorKind::Transport);
    assert!(err.message().contains("content block index"), "{err}");
    // Usage counts that would overflow when summed saturate.
    let mut body = start.to_vec();
    body.extend_from_slice(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    let (chunks, err) = run(vec![Bytes::from(body)], anthropic());
    assert!(err.is_none(), "{err:?}");
    let usage = chunks.last().unwrap().usage().unwrap();
    assert_eq!(usage.prompt_tokens, u64::MAX);
    assert_eq!(usage.total_tokens, u64::MAX);
}

#[test]
fn an_event_past_the_limit_is_classified() {
    let mut body = b"data: ".to_vec();
    body.resize(2 << 20, b'x');
    let (_, err) = run(vec![Bytes::from(body)], openai());
    let err = err.expect("too large");
    assert_eq!(err.kind(), ErrorKind::Transport);
    assert!(err.should_fall_back());
    assert_eq!(err.code(), Some("upstream_event_too_large"));
}

#[test]
fn an_anthropic_stream_failing_after_message_start_reports_its_usage() {
    let body = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1,\"cache_creation_input_tokens\":100}}}\n\n\
event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
    let (_, err) = run(vec![Bytes::from_static(body)], anthropic());
    let err = err.expect("an error event");
    assert_eq!(err.kind(), ErrorKind::Overloaded);
    // The input was processed (and the cache written): the attempt was paid for.
    let usage = err.usage().expect("usage from message_start");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (125, 1));
    let written = usage
        .prompt_tokens_details
        .as_ref()
        .unwrap()
        .cache_write_tokens;
    assert_eq!(written, Some(100));
    assert_eq!(
        err.paid_attempts()[0].model.as_deref(),
        Some("claude-sonnet-4-5")
    );
    // Before `message_start` nothing was reported.
    let body = b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
    let (_, err) = run(vec![Bytes::from_static(body)], anthropic());
    assert!(err.expect("an error event").usage().is_none());
}

/// Splits SSE text into (event name, data as JSON).
fn sse_events(text: &str) -> Vec<(String, serde_json::Value)> {
    text.split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .map(|f| {
            let mut name = String::new();
            let mut data = String::new();
            for line in f.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (name, serde_json::from_str(&data).expect(&data))
        })
        .collect()
}

/// A Messages stream answering a Messages request reaches the client event for event, equal
/// as JSON values (thinking signatures, citations and unknown events included), whatever
/// the body's framing; the chat view of the same chunks still carries text, tool arguments
/// and usage for the layers.
#[test]
fn native_anthropic_events_reach_the_client_as_sent() {
    use llm_tower_core::dialect::messages::EventEncoder;
    let corpus = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../llm-tower-core/tests/corpus/messages/events_thinking_tools.sse"
    ))
    .unwrap();
    let want = sse_events(&corpus);
    for cuts in [
        vec![],
        vec![7, 100, 101, 900],
        (1..60).map(|i| i * 37).collect(),
    ] {
        let native = AnthropicDecoder::new(Arc::from("anthropic"), None, "m".into()).native(true);
        let (chunks, err) = run(split(corpus.as_bytes(), &cuts), native);
        assert!(err.is_none(), "{err:?}");
        let mut enc = EventEncoder::new();
        let mut out = Vec::new();
        for c in &chunks {
            enc.push(c, &mut out);
        }
        enc.finish(&mut out);
        assert_eq!(sse_events(std::str::from_utf8(&out).unwrap()), want);
        // The view: the same chunks as without native frames, plus carriers.
        let (plain, _) = run(vec![Bytes::from(corpus.clone())], anthropic());
        let strip = |cs: &[ChatChunk]| -> Vec<ChatChunk> {
            let mut cs: Vec<ChatChunk> = cs
                .iter()
                .filter(|c| !(c.choices.is_empty() && c.usage.is_none()))
                .cloned()
                .collect();
            for c in &mut cs {
                c.extra.remove(llm_tower_core::dialect::NATIVE_EVENT);
            }
            cs
        };
        assert_eq!(normalized(strip(&chunks)), normalized(strip(&plain)));
    }
}

const RESPONSES: &str = "event: response.created\n\
data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"created_at\":7,\"model\":\"gpt-4.1\",\"status\":\"in_progress\",\"output\":[]}}\n\n\
event: response.output_item.added\n\
data: {\"type\":\"response.output_item.added\",\"sequence_number\":1,\"output_index\":0,\"item\":{\"id\":\"fc_1\",\"type\":\"function_call\",\"status\":\"in_progress\",\"call_id\":\"call_1\",\"name\":\"get\",\"arguments\":\"\"}}\n\n\
event: response.function_call_arguments.delta\n\
data: {\"type\":\"response.function_call_arguments.delta\",\"sequence_number\":2,\"item_id\":\"fc_1\",\"output_index\":0,\"delta\":\"{\\\"a\\\":\"}\n\n\
event: response.function_call_arguments.delta\n\
data: {\"type\":\"response.function_call_arguments.delta\",\"sequence_number\":3,\"item_id\":\"fc_1\",\"output_index\":0,\"delta\":\"1}\"}\n\n\
event: response.completed\n\
data: {\"type\":\"response.completed\",\"sequence_number\":4,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"created_at\":7,\"model\":\"gpt-4.1\",\"status\":\"completed\",\"output\":[],\"usage\":{\"input_tokens\":9,\"output_tokens\":4,\"total_tokens\":13,\"input_tokens_details\":{\"cached_tokens\":2}}}}\n\n";

#[test]
fn responses_events_keep_their_frames_and_give_the_layers_a_chat_view() {
    use crate::openai::ResponsesDecoder;
    use llm_tower_core::dialect::native_event;
    let decoder = || ResponsesDecoder::new(Arc::from("openai"), None, "gpt-4.1");
    let (chunks, err) = run(vec![Bytes::from_static(RESPONSES.as_bytes())], decoder());
    assert!(err.is_none(), "{err:?}");
    // Every event is carried as it came, once, in order.
    let frames: String = chunks.iter().filter_map(native_event).collect();
    assert_eq!(frames, RESPONSES);
    // The view: one call with its arguments, the finish and the usage.
    let args: String = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .flat_map(|c| c.delta.tool_calls.iter().flatten())
        .filter_map(|t| t.function.as_ref()?.arguments.clone())
        .collect();
    assert_eq!(args, "{\"a\":1}");
    let finish = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .find_map(|c| c.finish_reason().map(str::to_owned));
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    let u = chunks.last().unwrap().usage().unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.cached_tokens()),
        (9, 4, 2)
    );
    // Any split gives the same chunks; a cut before `response.completed` is an error.
    let whole = run(vec![Bytes::from_static(RESPONSES.as_bytes())], decoder()).0;
    let parts = split(RESPONSES.as_bytes(), &[17, 300, 301, 900]);
    assert_eq!(run(parts, decoder()).0, whole);
    let cut = RESPONSES.find("event: response.completed").unwrap();
    let (_, err) = run(
        vec![Bytes::copy_from_slice(&RESPONSES.as_bytes()[..cut])],
        decoder(),
    );
    assert!(err.is_some());
    // An upstream failure mid-stream is an error, classified.
    let failed = "event: response.created\n\
data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"r\",\"model\":\"m\"}}\n\n\
event: response.failed\n\
data: {\"type\":\"response.failed\",\"sequence_number\":1,\"response\":{\"id\":\"r\",\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"boom\"}}}\n\n";
    let (_, err) = run(vec![Bytes::from_static(failed.as_bytes())], decoder());
    assert!(err.unwrap().message().contains("boom"));
}

#[test]
fn an_event_name_that_is_not_utf8_gives_way_to_the_events_type() {
    use crate::openai::ResponsesDecoder;
    use llm_tower_core::dialect::native_event;
    // RESPONSES with its first event's name spoilt.
    let first = RESPONSES.find('\n').unwrap();
    let mut bad = b"event: \xff\xfe".to_vec();
    bad.extend_from_slice(&RESPONSES.as_bytes()[first..]);
    let decoder = ResponsesDecoder::new(Arc::from("openai"), None, "gpt-4.1");
    let (chunks, err) = run(vec![Bytes::from(bad)], decoder);
    assert!(err.is_none(), "{err:?}");
    let frames: String = chunks.iter().filter_map(native_event).collect();
    assert_eq!(frames, RESPONSES, "the type named the first event");
}
