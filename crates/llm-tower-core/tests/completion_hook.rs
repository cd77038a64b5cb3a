//! The stream completion hook runs exactly once, for every way a response can finish.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use llm_tower_core::{ChatChunk, ChatResponse, ChunkStream, LlmError, LlmResponse, Outcome, Usage};

type Log = Arc<Mutex<Vec<String>>>;

fn recorder(log: &Log, name: &'static str) -> impl FnOnce(&Outcome) + Send + 'static {
    let log = log.clone();
    move |o: &Outcome| {
        let what = match o {
            Outcome::Completed { usage } => format!(
                "{name}:completed:{:?}",
                usage.as_ref().map(|u| u.total_tokens)
            ),
            Outcome::Failed { error, usage } => format!(
                "{name}:failed:{}:{:?}",
                error.kind(),
                usage.as_ref().map(|u| u.total_tokens)
            ),
            Outcome::Dropped { usage } => format!(
                "{name}:dropped:{:?}",
                usage.as_ref().map(|u| u.total_tokens)
            ),
        };
        log.lock().unwrap().push(what);
    }
}

fn chunks(n: usize, usage: bool) -> Vec<Result<ChatChunk, LlmError>> {
    let mut v: Vec<_> = (0..n)
        .map(|i| Ok(ChatChunk::text("id", "m", format!("c{i}"))))
        .collect();
    if usage {
        let mut last = ChatChunk::text("id", "m", "");
        last.choices.clear();
        last.usage = Some(Some(Usage::new(7, 5)));
        v.push(Ok(last));
    }
    v
}

#[tokio::test]
async fn completed_stream_fires_once_with_usage_in_order() {
    let log = Log::default();
    let mut s = ChunkStream::new(futures_util::stream::iter(chunks(3, true)));
    s.on_finish(recorder(&log, "inner"));
    s.on_finish(recorder(&log, "outer"));
    let mut n = 0;
    while let Some(item) = s.next().await {
        item.unwrap();
        n += 1;
    }
    assert_eq!(n, 4);
    // Polling after the end and dropping must not fire again.
    assert!(s.next().await.is_none());
    drop(s);
    assert_eq!(
        *log.lock().unwrap(),
        ["inner:completed:Some(12)", "outer:completed:Some(12)"]
    );
}

#[tokio::test]
async fn failed_stream_fires_once_and_ends() {
    let log = Log::default();
    let mut items = chunks(2, false);
    items.push(Err(LlmError::transport("connection reset")));
    items.push(Ok(ChatChunk::text("id", "m", "never seen")));
    let mut s = ChunkStream::new(futures_util::stream::iter(items));
    s.on_finish(recorder(&log, "h"));
    let collected: Vec<_> = (&mut s).collect().await;
    assert_eq!(collected.len(), 3, "stream ends at the error");
    assert!(collected[2].is_err());
    drop(s);
    assert_eq!(*log.lock().unwrap(), ["h:failed:transport:None"]);
}

#[tokio::test]
async fn dropped_stream_fires_once_as_dropped() {
    let log = Log::default();
    let mut s = ChunkStream::new(futures_util::stream::iter(chunks(5, true)));
    s.on_finish(recorder(&log, "h"));
    s.next().await.unwrap().unwrap();
    assert!(log.lock().unwrap().is_empty(), "not finished yet");
    drop(s);
    assert_eq!(*log.lock().unwrap(), ["h:dropped:None"]);
}

#[tokio::test]
async fn never_polled_stream_dropped_fires_dropped() {
    let log = Log::default();
    let mut resp = LlmResponse::stream(futures_util::stream::iter(chunks(1, false)));
    resp.on_finish(recorder(&log, "h"));
    drop(resp);
    assert_eq!(*log.lock().unwrap(), ["h:dropped:None"]);
}

#[tokio::test(start_paused = true)]
async fn wrapped_stream_hooks_see_what_the_caller_sees() {
    // A wrapper (like a stall timeout) turns a hanging upstream into an error; hooks
    // registered before the wrap see that error, not a drop.
    let log = Log::default();
    let mut s2 = ChunkStream::new(
        futures_util::stream::iter(chunks(1, false)).chain(futures_util::stream::pending()),
    );
    s2.on_finish(recorder(&log, "inner2"));
    s2.wrap(|inner| {
        futures_util::stream::unfold((inner, false), |(mut inner, done)| async move {
            if done {
                return None;
            }
            match tokio::time::timeout(Duration::from_secs(5), inner.next()).await {
                Ok(Some(item)) => Some((item, (inner, false))),
                Ok(None) => None,
                Err(_) => Some((Err(LlmError::timeout("stalled")), (inner, true))),
            }
        })
    });
    let items: Vec<_> = s2.collect().await;
    assert_eq!(items.len(), 2);
    assert!(items[1].is_err());
    assert_eq!(*log.lock().unwrap(), ["inner2:failed:timeout:None"]);
}

#[tokio::test]
async fn complete_response_fires_immediately_once() {
    let log = Log::default();
    let mut r = ChatResponse::from_text("m", "hi");
    r.usage = Some(Usage::new(1, 2));
    let mut resp = LlmResponse::complete(r);
    resp.on_finish(recorder(&log, "h"));
    assert_eq!(*log.lock().unwrap(), ["h:completed:Some(3)"]);
    drop(resp);
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn hook_added_after_finish_does_not_run() {
    let log = Log::default();
    let mut s = ChunkStream::new(futures_util::stream::iter(chunks(1, false)));
    while s.next().await.is_some() {}
    s.on_finish(recorder(&log, "late"));
    drop(s);
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn into_complete_aggregates_and_reports_errors() {
    let resp = LlmResponse::stream(futures_util::stream::iter(chunks(3, true)));
    let full = resp.into_complete().await.unwrap();
    assert_eq!(full.text(), "c0c1c2");
    assert_eq!(full.usage.unwrap().total_tokens, 12);

    let mut items = chunks(1, false);
    items.push(Err(LlmError::unavailable("gone")));
    let resp = LlmResponse::stream(futures_util::stream::iter(items));
    assert_eq!(
        resp.into_complete().await.unwrap_err().kind(),
        llm_tower_core::ErrorKind::Unavailable
    );
}

fn encoded(json: &str) -> llm_tower_core::StreamEvent {
    llm_tower_core::EncodedChunk::from_json(bytes::Bytes::copy_from_slice(json.as_bytes()))
        .expect(json)
        .into()
}

#[tokio::test]
async fn encoded_events_report_usage_without_a_decode_at_the_event_level() {
    let log = Log::default();
    let events = vec![
        Ok(encoded(
            r#"{"id":"c","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}"#,
        )),
        Ok(encoded(
            r#"{"id":"c","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}"#,
        )),
    ];
    let mut s = ChunkStream::from_events(futures_util::stream::iter(events.clone()));
    s.on_finish(recorder(&log, "h"));
    let mut seen = Vec::new();
    while let Some(e) = s.next_event().await {
        seen.push(e.unwrap());
    }
    // Passed as they came (still encoded), and the hook saw the usage.
    assert!(
        seen.iter()
            .all(|e| matches!(e, llm_tower_core::StreamEvent::Encoded(_)))
    );
    assert_eq!(
        seen,
        events.into_iter().map(Result::unwrap).collect::<Vec<_>>()
    );
    assert_eq!(*log.lock().unwrap(), vec!["h:completed:Some(12)"]);
}

#[tokio::test]
async fn an_event_the_typed_view_cannot_decode_fails_the_stream_once() {
    // Valid JSON the check accepts, but beyond f64's range where serde keeps a number.
    let odd = encoded(r#"{"id":"c","x":1e400,"choices":[]}"#);
    let log = Log::default();
    let mut s = ChunkStream::from_events(futures_util::stream::iter([Ok(odd.clone()), Ok(odd)]));
    s.on_finish(recorder(&log, "h"));
    let err = s.next().await.unwrap().unwrap_err();
    assert_eq!(err.kind(), llm_tower_core::ErrorKind::Transport);
    assert!(s.next().await.is_none());
    assert_eq!(*log.lock().unwrap(), vec!["h:failed:transport:None"]);
}

#[tokio::test(start_paused = true)]
async fn wrap_gives_typed_chunks_and_wrap_events_keeps_them_encoded() {
    let json =
        r#"{"id":"c","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}"#;
    let mut s = ChunkStream::from_events(futures_util::stream::iter([Ok(encoded(json))]));
    s.wrap_events(|inner| inner);
    s.wrap(|inner| {
        inner.map(|c| {
            c.map(|mut c: ChatChunk| {
                c.model = "seen typed".into();
                c
            })
        })
    });
    let out = s.next_event().await.unwrap().unwrap();
    // After a typed wrap, the event is typed (decoded once, for it).
    let llm_tower_core::StreamEvent::Chunk(c) = out else {
        panic!("{out:?}");
    };
    assert_eq!(
        (c.model.as_str(), c.choices[0].delta.text()),
        ("seen typed", Some("hi"))
    );
}
