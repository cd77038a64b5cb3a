//! Comparing two answers to the same request: exactly, after normalising, and for JSON
//! answers field by field. Shared by `eval` (a candidate against the expected answer or a
//! reference candidate) and shadow traffic (the candidate against the served answer).

use serde_json::Value;

/// How two answers compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Comparison {
    /// Byte for byte equal.
    pub exact: bool,
    /// Equal after [`normalise`] (or, when both are JSON, equal as JSON values with their
    /// strings normalised).
    pub normalised: bool,
    /// When both are JSON objects: leaf fields (by JSON pointer) equal in both, and leaf
    /// fields in either.
    pub fields: Option<(u64, u64)>,
}

/// Compares answer `a` with answer `b`.
///
/// ```
/// use llm_tower_proxy::compare::compare;
///
/// let c = compare("Positive.", "positive");
/// assert!(!c.exact && c.normalised);
/// let c = compare(r#"{"label":"pos","score":1}"#, r#"{"score": 1, "label": "neg"}"#);
/// assert_eq!(c.fields, Some((1, 2)));
/// assert!(!c.normalised);
/// ```
pub fn compare(a: &str, b: &str) -> Comparison {
    let exact = a == b;
    let (ja, jb) = (parse_json(a), parse_json(b));
    match (ja, jb) {
        (Some(ja), Some(jb)) => {
            let fields = match (&ja, &jb) {
                (Value::Object(_), Value::Object(_)) => Some(field_agreement(&ja, &jb)),
                _ => None,
            };
            Comparison {
                exact,
                normalised: exact || json_eq(&ja, &jb),
                fields,
            }
        }
        _ => Comparison {
            exact,
            normalised: exact || normalise(a) == normalise(b),
            fields: None,
        },
    }
}

/// Lower case, inner whitespace collapsed to one space, surrounding whitespace, quotes and
/// final punctuation removed: `"  Positive.\n"` and `positive` normalise alike.
pub fn normalise(s: &str) -> String {
    let lower = s.to_lowercase();
    let joined = lower.split_whitespace().collect::<Vec<_>>().join(" ");
    joined
        .trim_matches(|c: char| matches!(c, '"' | '\'' | '`'))
        .trim_end_matches(['.', '!', '?', ';', ':', ','])
        .trim()
        .to_owned()
}

/// An answer as JSON, also when wrapped in a Markdown code fence (as models often do).
fn parse_json(s: &str) -> Option<Value> {
    let t = s.trim();
    if !t.starts_with(['{', '[']) && !t.starts_with("```") {
        return None;
    }
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .map_or(t, |x| x.trim_end().trim_end_matches("```"));
    serde_json::from_str(t.trim()).ok()
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => normalise(x) == normalise(y),
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// Leaf fields equal in both, and leaf fields in either (a field missing on one side
/// counts as a disagreement). Bounded: at most [`MAX_FIELDS`] leaves are looked at.
fn field_agreement(a: &Value, b: &Value) -> (u64, u64) {
    let mut la = Vec::new();
    let mut lb = Vec::new();
    leaves(a, String::new(), &mut la, 0);
    leaves(b, String::new(), &mut lb, 0);
    let mut agree = 0u64;
    let mut total = 0u64;
    for (p, v) in &la {
        total += 1;
        if lb.iter().any(|(q, w)| q == p && json_eq(v, w)) {
            agree += 1;
        }
    }
    total += lb
        .iter()
        .filter(|(q, _)| !la.iter().any(|(p, _)| p == q))
        .count() as u64;
    (agree, total)
}

/// The most leaves of one answer that field agreement looks at.
pub const MAX_FIELDS: usize = 1024;

fn leaves<'a>(v: &'a Value, path: String, out: &mut Vec<(String, &'a Value)>, depth: usize) {
    if out.len() >= MAX_FIELDS {
        return;
    }
    match v {
        Value::Object(m) if depth < 32 && !m.is_empty() => {
            for (k, x) in m {
                leaves(x, format!("{path}/{k}"), out, depth + 1);
            }
        }
        _ => out.push((path, v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prose_and_json() {
        assert!(compare("a", "a").exact);
        let c = compare("  The  Answer is 4.\n", "the answer is 4");
        assert!(!c.exact && c.normalised && c.fields.is_none());
        let c = compare(
            r#"{"a":{"b":1,"c":"X"}}"#,
            "```json\n{\"a\": {\"c\": \"x\", \"b\": 1.0}}\n```",
        );
        assert!(c.normalised);
        assert_eq!(c.fields, Some((2, 2)));
        let c = compare(r#"{"a":1,"b":2}"#, r#"{"a":1,"c":2}"#);
        assert_eq!(c.fields, Some((1, 3)));
        assert!(!compare("{\"a\":1", "{\"a\":1}").normalised);
    }
}
