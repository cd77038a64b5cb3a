//! What a value really occupies in memory: its own size plus every heap allocation it owns,
//! each rounded up the way allocators do. The cache weighs entries with it (so its byte
//! bound is a bound on the process's memory), and the cache and validation layers bound
//! the streams they buffer with it.

use llm_tower_core::{
    ChatChunk, ChatResponse, Choice, ChunkChoice, CompletionTokensDetails, Content, Delta,
    EncodedResponse, FunctionCall, FunctionCallDelta, Message, PromptTokensDetails, Role,
    StreamEvent, ToolCall, ToolCallDelta, Usage,
};
use serde_json::{Map, Value};

/// What an allocation of `n` bytes costs, the larger of what glibc and mimalloc (the
/// gateway's allocator) take: small blocks round up to 16 bytes plus ~16 of bookkeeping;
/// up to 128 KiB, to one of 8 size classes per power of two (mimalloc's bins, ≤ 12.5 %);
/// beyond, to mimalloc's 64 KiB slices (glibc maps whole 4 KiB pages).
pub(crate) const fn alloc(n: usize) -> usize {
    const SLICE: usize = 64 * 1024;
    if n == 0 {
        0
    } else if n <= 1024 {
        n.next_multiple_of(16) + 16
    } else if n <= 2 * SLICE {
        let class = 1 << (usize::BITS - 1 - n.leading_zeros()) >> 3;
        n.next_multiple_of(class) + 16
    } else {
        n.saturating_add(SLICE - 1) / SLICE * SLICE
    }
}

/// Heap bytes a value owns (not counting its own inline size).
pub(crate) trait Heap {
    fn heap(&self) -> usize;
}

/// A value's inline size plus its heap, for a value that lives in an allocation of its own.
pub(crate) fn boxed<T: Heap>(v: &T) -> usize {
    alloc(size_of::<T>()) + v.heap()
}

impl Heap for String {
    fn heap(&self) -> usize {
        alloc(self.capacity())
    }
}

impl<T: Heap> Heap for Option<T> {
    fn heap(&self) -> usize {
        self.as_ref().map_or(0, Heap::heap)
    }
}

impl<T: Heap> Heap for Box<T> {
    fn heap(&self) -> usize {
        boxed(&**self)
    }
}

impl<T: Heap> Heap for Vec<T> {
    fn heap(&self) -> usize {
        alloc(self.capacity() * size_of::<T>()) + self.iter().map(Heap::heap).sum::<usize>()
    }
}

impl Heap for Map<String, Value> {
    fn heap(&self) -> usize {
        // A B-tree: keys and values in nodes of up to 11, plus node headers (~1/4 extra).
        self.iter()
            .map(|(k, v)| (size_of::<String>() + size_of::<Value>()) * 5 / 4 + k.heap() + v.heap())
            .sum::<usize>()
            + if self.is_empty() { 0 } else { alloc(16) }
    }
}

impl Heap for Value {
    fn heap(&self) -> usize {
        match self {
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
            Value::String(s) => s.heap(),
            Value::Array(a) => a.heap(),
            Value::Object(o) => o.heap(),
        }
    }
}

impl Heap for Role {
    fn heap(&self) -> usize {
        match self {
            Role::Other(s) => s.heap(),
            _ => 0,
        }
    }
}

impl Heap for Usage {
    fn heap(&self) -> usize {
        self.prompt_tokens_details.as_ref().map_or(0, boxed)
            + self.completion_tokens_details.as_ref().map_or(0, boxed)
            + self.extra.heap()
    }
}

impl Heap for PromptTokensDetails {
    fn heap(&self) -> usize {
        self.extra.heap()
    }
}

impl Heap for CompletionTokensDetails {
    fn heap(&self) -> usize {
        self.extra.heap()
    }
}

impl Heap for Content {
    fn heap(&self) -> usize {
        match self {
            Content::Text(s) => s.heap(),
            // Rare in answers: their JSON twice over (strings, maps and the part headers).
            Content::Parts(parts) => {
                alloc(parts.capacity() * 64)
                    + serde_json::to_vec(parts).map_or(4096, |v| 2 * v.len())
            }
        }
    }
}

impl Heap for FunctionCall {
    fn heap(&self) -> usize {
        self.name.heap() + self.arguments.heap() + self.extra.heap()
    }
}

impl Heap for ToolCall {
    fn heap(&self) -> usize {
        self.id.heap() + self.kind.heap() + self.function.heap() + self.extra.heap()
    }
}

impl Heap for Message {
    fn heap(&self) -> usize {
        self.role.heap()
            + self.content.as_ref().map_or(0, |c| c.heap())
            + self.name.heap()
            + self.tool_calls.heap()
            + self.tool_call_id.heap()
            + self.extra.heap()
    }
}

impl Heap for Choice {
    fn heap(&self) -> usize {
        self.message.heap() + self.finish_reason.heap() + self.extra.heap()
    }
}

impl Heap for ChatResponse {
    fn heap(&self) -> usize {
        self.id.heap()
            + self.object.heap()
            + self.model.heap()
            + self.choices.heap()
            + self.usage.heap()
            + self.extra.heap()
    }
}

impl Heap for FunctionCallDelta {
    fn heap(&self) -> usize {
        self.name.heap() + self.arguments.heap() + self.extra.heap()
    }
}

impl Heap for ToolCallDelta {
    fn heap(&self) -> usize {
        self.id.heap() + self.kind.heap() + self.function.heap() + self.extra.heap()
    }
}

impl Heap for Delta {
    fn heap(&self) -> usize {
        self.role.heap()
            + self.content.as_ref().map_or(0, |c| c.heap())
            + self.tool_calls.heap()
            + self.extra.heap()
    }
}

impl Heap for ChunkChoice {
    fn heap(&self) -> usize {
        self.delta.heap() + self.finish_reason.as_ref().map_or(0, |f| f.heap()) + self.extra.heap()
    }
}

impl Heap for ChatChunk {
    fn heap(&self) -> usize {
        self.id.heap()
            + self.object.heap()
            + self.model.heap()
            + self.choices.heap()
            + self.usage.as_ref().map_or(0, |u| u.heap())
            + self.extra.heap()
    }
}

impl Heap for StreamEvent {
    fn heap(&self) -> usize {
        match self {
            StreamEvent::Chunk(c) => c.heap(),
            // The JSON as if in an allocation of its own (in a stream it is a slice of a
            // read buffer of about the events' size; in a stored entry, of one for all).
            StreamEvent::Encoded(c) => {
                alloc(c.json().len())
                    + c.usage()
                        .map_or(0, |u| alloc(size_of::<Usage>()) + u.heap())
            }
            // Likewise the data, and the name (an upper bound: the dialects' own names
            // are static strings); the head is shared by the stream's events.
            StreamEvent::Native(e) => {
                alloc(e.name().len())
                    + alloc(e.data().len())
                    + e.usage()
                        .map_or(0, |u| alloc(size_of::<Usage>()) + u.heap())
            }
        }
    }
}

impl Heap for EncodedResponse {
    fn heap(&self) -> usize {
        // The document (the cache keeps an exactly sized copy; see `MemoryStore`), the
        // shared header `Bytes` allocates once cloned, the model and the boxed usage.
        alloc(self.json().len())
            + alloc(32)
            + alloc(self.model().len())
            + self.usage().map_or(0, boxed)
    }
}

/// Memory a buffered chunk holds: its inline size plus its heap.
/// Bytes a stream event held in a vector occupies.
pub(crate) fn event(e: &StreamEvent) -> usize {
    size_of::<StreamEvent>() + e.heap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_strings_vectors_and_rounding() {
        assert_eq!(alloc(0), 0);
        assert_eq!(alloc(1), 32);
        assert_eq!(alloc(16), 32);
        assert_eq!(alloc(17), 48);
        assert_eq!(alloc(1025), 1024 + 128 + 16);
        assert_eq!(alloc(100_000), 106_496 + 16);
        assert_eq!(alloc(200 * 1024 + 1), 256 * 1024);
        assert_eq!(alloc(usize::MAX), usize::MAX / (64 * 1024) * 64 * 1024);
        let s = String::from("hello");
        assert_eq!(s.heap(), alloc(s.capacity()));
        let r = ChatResponse::from_text("m", "x".repeat(1000));
        // The text dominates; every allocation on the way is counted too.
        assert!(r.heap() > 1000 + size_of::<Choice>(), "{}", r.heap());
        let c = StreamEvent::from(ChatChunk::default());
        assert!(event(&c) >= size_of::<ChatChunk>());
        let json = br#"{"id":"c","choices":[],"usage":{"prompt_tokens":1}}"#;
        let e = StreamEvent::from(
            llm_tower_core::EncodedChunk::from_json(json.as_slice().into()).unwrap(),
        );
        assert!(
            event(&e) >= json.len() + size_of::<Usage>(),
            "{}",
            event(&e)
        );
    }
}
