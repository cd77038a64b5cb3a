use llm_tower_providers::sse::SseParser;
use proptest::prelude::*;

/// An OpenAI-style stream with comments, keep-alives, CRLF, a multi-line event and [DONE].
const STREAM: &[u8] = b": OPENROUTER PROCESSING\r\n\r\n\
data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
: keep-alive\n\n\
event: message\r\ndata: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\xc3\xa9\"}}]}\r\n\r\n\
data: {\"id\":\"c1\",\r\ndata: \"x\":1}\r\r\
id: 9\nretry: 100\ndata:{\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\n\
data: [DONE]\n\n";

fn events(chunks: &[&[u8]]) -> Vec<(Option<String>, Vec<u8>)> {
    let mut p = SseParser::new();
    let mut out = Vec::new();
    for c in chunks {
        p.push(c);
        while let Some(ev) = p.next_event().unwrap() {
            out.push((ev.event().map(str::to_owned), ev.data().to_vec()));
        }
    }
    while let Some(ev) = p.finish() {
        out.push((ev.event().map(str::to_owned), ev.data().to_vec()));
    }
    out
}

#[test]
fn whole_stream() {
    let evs = events(&[STREAM]);
    assert_eq!(evs.len(), 5);
    assert_eq!(evs[1].0.as_deref(), Some("message"));
    assert_eq!(evs[2].1, b"{\"id\":\"c1\",\n\"x\":1}");
    assert_eq!(evs[4].1, b"[DONE]");
}

#[test]
fn every_single_split_point() {
    let whole = events(&[STREAM]);
    for i in 0..=STREAM.len() {
        let (a, b) = STREAM.split_at(i);
        assert_eq!(events(&[a, b]), whole, "split at {i}");
    }
    let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
    assert_eq!(events(&bytes), whole, "byte by byte");
}

proptest! {
    #[test]
    fn any_chunking_gives_the_same_events(cuts in proptest::collection::vec(0..STREAM.len(), 0..40)) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        cuts.dedup();
        let mut chunks = Vec::new();
        let mut prev = 0;
        for c in cuts {
            chunks.push(&STREAM[prev..c]);
            prev = c;
        }
        chunks.push(&STREAM[prev..]);
        prop_assert_eq!(events(&chunks), events(&[STREAM]));
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512), split in 0usize..512) {
        let split = split.min(data.len());
        let mut p = SseParser::with_max_event_bytes(256);
        p.push(&data[..split]);
        while let Ok(Some(_)) = p.next_event() {}
        p.push(&data[split..]);
        while let Ok(Some(_)) = p.next_event() {}
        let _ = p.finish();
    }
}
