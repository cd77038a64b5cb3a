//! Turning streams into complete responses and back.

use crate::request::{Content, Extra, FunctionCall, Message, Role, ToolCall};
use crate::response::{
    ChatChunk, ChatResponse, Choice, ChunkChoice, Delta, FunctionCallDelta, ToolCallDelta, Usage,
};

/// Assembles [`ChatChunk`]s into the [`ChatResponse`] they add up to: text and tool-call
/// fragments concatenated per choice, the finish reason and the final usage kept.
///
/// ```
/// use llm_tower_core::{ChatChunk, StreamAccumulator};
/// let mut acc = StreamAccumulator::default();
/// acc.push(&ChatChunk::text("id", "m", "Hel"));
/// acc.push(&ChatChunk::text("id", "m", "lo"));
/// assert_eq!(acc.finish().text(), "Hello");
/// ```
#[derive(Debug, Default, Clone)]
pub struct StreamAccumulator {
    id: String,
    model: String,
    created: u64,
    choices: Vec<ChoiceAcc>,
    usage: Option<Usage>,
    extra: Extra,
}

#[derive(Debug, Default, Clone)]
struct ChoiceAcc {
    index: u32,
    role: Option<Role>,
    text: Option<String>,
    refusal: Option<String>,
    tool_calls: Vec<ToolCallAcc>,
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Clone)]
struct ToolCallAcc {
    index: u32,
    id: String,
    kind: String,
    name: String,
    arguments: String,
}

impl StreamAccumulator {
    /// Adds one chunk.
    pub fn push(&mut self, chunk: &ChatChunk) {
        if self.id.is_empty() {
            self.id.clone_from(&chunk.id);
            self.created = chunk.created;
            self.extra.clone_from(&chunk.extra);
        }
        if !chunk.model.is_empty() {
            self.model.clone_from(&chunk.model);
        }
        if let Some(u) = chunk.usage() {
            self.usage = Some(u.clone());
        }
        for c in &chunk.choices {
            let acc = match self.choices.iter_mut().position(|a| a.index == c.index) {
                Some(i) => &mut self.choices[i],
                None => {
                    self.choices.push(ChoiceAcc {
                        index: c.index,
                        ..ChoiceAcc::default()
                    });
                    self.choices.last_mut().expect("just pushed")
                }
            };
            if let Some(r) = &c.delta.role {
                acc.role = Some(r.clone());
            }
            if let Some(t) = c.delta.text() {
                acc.text.get_or_insert_with(String::new).push_str(t);
            }
            if let Some(r) = c.delta.extra.get("refusal").and_then(|v| v.as_str()) {
                acc.refusal.get_or_insert_with(String::new).push_str(r);
            }
            for tc in c.delta.tool_calls.iter().flatten() {
                let call = match acc.tool_calls.iter_mut().position(|t| t.index == tc.index) {
                    Some(i) => &mut acc.tool_calls[i],
                    None => {
                        acc.tool_calls.push(ToolCallAcc {
                            index: tc.index,
                            kind: "function".into(),
                            ..ToolCallAcc::default()
                        });
                        acc.tool_calls.last_mut().expect("just pushed")
                    }
                };
                if let Some(id) = &tc.id {
                    call.id.clone_from(id);
                }
                if let Some(k) = &tc.kind {
                    call.kind.clone_from(k);
                }
                if let Some(f) = &tc.function {
                    if let Some(n) = &f.name {
                        call.name.push_str(n);
                    }
                    if let Some(a) = &f.arguments {
                        call.arguments.push_str(a);
                    }
                }
            }
            if let Some(r) = c.finish_reason() {
                acc.finish_reason = Some(r.to_owned());
            }
        }
    }

    /// The text of choice 0 so far.
    pub fn text(&self) -> &str {
        self.choices
            .iter()
            .find(|c| c.index == 0)
            .and_then(|c| c.text.as_deref())
            .unwrap_or("")
    }

    /// The final usage, if a chunk carried it.
    pub fn usage(&self) -> Option<&Usage> {
        self.usage.as_ref()
    }

    /// The assembled response.
    pub fn finish(self) -> ChatResponse {
        let mut choices: Vec<Choice> = self
            .choices
            .into_iter()
            .map(|c| {
                let tool_calls = (!c.tool_calls.is_empty()).then(|| {
                    c.tool_calls
                        .into_iter()
                        .map(|t| ToolCall {
                            id: t.id,
                            kind: t.kind,
                            function: FunctionCall {
                                name: t.name,
                                arguments: t.arguments,
                                extra: Extra::new(),
                            },
                            extra: Extra::new(),
                        })
                        .collect::<Vec<_>>()
                });
                let mut extra = Extra::new();
                if let Some(r) = c.refusal {
                    extra.insert("refusal".into(), r.into());
                }
                let content = match c.text {
                    Some(t) => Some(Some(Content::Text(t))),
                    None if tool_calls.is_some() => Some(None),
                    None => Some(Some(Content::Text(String::new()))),
                };
                Choice {
                    index: c.index,
                    message: Message {
                        role: c.role.unwrap_or(Role::Assistant),
                        content,
                        tool_calls,
                        extra,
                        ..Message::default()
                    },
                    finish_reason: c.finish_reason,
                    extra: Extra::new(),
                }
            })
            .collect();
        choices.sort_by_key(|c| c.index);
        ChatResponse {
            id: self.id,
            object: "chat.completion".into(),
            created: self.created,
            model: self.model,
            choices,
            usage: self.usage,
            extra: self.extra,
        }
    }
}

impl ChatResponse {
    /// The chunks a stream of this response would have carried: per choice a role chunk
    /// with the whole text and tool calls, then a finish chunk; then a usage chunk if the
    /// response has usage. Used to replay a complete (e.g. cached) answer as a stream.
    pub fn to_chunks(&self) -> Vec<ChatChunk> {
        let base = |choices: Vec<ChunkChoice>, usage: Option<Option<Usage>>| ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            extra: Extra::new(),
        };
        let mut out = Vec::with_capacity(self.choices.len() * 2 + 1);
        let usage_marker = self.usage.as_ref().map(|_| None);
        for c in &self.choices {
            let tool_calls = c.message.tool_calls.as_ref().map(|calls| {
                calls
                    .iter()
                    .enumerate()
                    .map(|(i, t)| ToolCallDelta {
                        index: i as u32,
                        id: Some(t.id.clone()),
                        kind: Some(t.kind.clone()),
                        function: Some(FunctionCallDelta {
                            name: Some(t.function.name.clone()),
                            arguments: Some(t.function.arguments.clone()),
                            extra: Extra::new(),
                        }),
                        extra: Extra::new(),
                    })
                    .collect()
            });
            let text = c.message.content().map(Content::text);
            out.push(base(
                vec![ChunkChoice {
                    index: c.index,
                    delta: Delta {
                        role: Some(c.message.role.clone()),
                        content: Some(text),
                        tool_calls,
                        extra: Extra::new(),
                    },
                    finish_reason: Some(None),
                    extra: Extra::new(),
                }],
                usage_marker.clone(),
            ));
            out.push(base(
                vec![ChunkChoice {
                    index: c.index,
                    delta: Delta::default(),
                    finish_reason: Some(c.finish_reason.clone()),
                    extra: Extra::new(),
                }],
                usage_marker.clone(),
            ));
        }
        if let Some(u) = &self.usage {
            out.push(base(Vec::new(), Some(Some(u.clone()))));
        }
        out
    }
}
