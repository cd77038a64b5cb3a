//! JSON parsing of bodies that are usually valid UTF-8.

use serde::Deserialize;

/// `serde_json::from_slice`, with UTF-8 checked once for the whole body instead of string
/// by string (`from_slice` validates every key and value it reads; a whole-body check is a
/// fraction of that). Invalid UTF-8 falls back to `from_slice`, for its error and position.
pub(crate) fn from_slice<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

/// [`from_slice`] of a type that reads a JSON object, refusing any other document (serde
/// reads a struct from an array too).
pub(crate) fn from_object<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => from_slice(bytes),
        _ => Err(serde::de::Error::custom("expected a JSON object")),
    }
}

/// A string (an object key, a role), borrowed from the input when it has no escapes
/// (serde's `Cow<str>` always allocates).
#[derive(Debug)]
pub(crate) enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(s) => s,
            Key::Owned(s) => s,
        }
    }

    pub(crate) fn into_owned(self) -> String {
        match self {
            Key::Borrowed(s) => s.to_owned(),
            Key::Owned(s) => s,
        }
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(s))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(s.to_owned()))
            }
            fn visit_string<E>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key::Owned(s))
            }
        }
        d.deserialize_str(V)
    }
}

/// A string member read as leniently as `Value::as_str` reads it: a string (borrowed where
/// it can be), anything else `None`, so a member of another type is skipped, not refused.
#[derive(Default)]
pub(crate) struct LenientStr<'de>(pub(crate) Option<Key<'de>>);

impl<'a> LenientStr<'a> {
    pub(crate) fn as_deref(&self) -> Option<&str> {
        self.0.as_ref().map(Key::as_str)
    }

    /// A string a hand-written scan found in `text` (its range between the quotes, and
    /// whether it holds escapes): borrowed, or decoded by serde where it has escapes.
    /// `None` when it does not decode.
    pub(crate) fn scanned(
        text: &'a str,
        found: Option<crate::encoded::scan::StringFound>,
    ) -> Option<Self> {
        Some(LenientStr(match found {
            None => None,
            Some((r, false)) => Some(Key::Borrowed(text.get(r)?)),
            Some((r, true)) => Some(Key::Owned(
                serde_json::from_str(text.get(r.start.checked_sub(1)?..r.end + 1)?).ok()?,
            )),
        }))
    }
}

impl std::fmt::Debug for LenientStr<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_deref().fmt(f)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for LenientStr<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess};
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = LenientStr<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(LenientStr(Some(Key::Borrowed(s))))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(LenientStr(Some(Key::Owned(s.to_owned()))))
            }
            fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
                Ok(LenientStr(Some(Key::Owned(s))))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(LenientStr(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(LenientStr(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(LenientStr(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(LenientStr(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(LenientStr(None))
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(LenientStr(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(LenientStr(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(LenientStr(None))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A JSON object's members in order, keys borrowed where they can be: for a parser that
/// reads a handful of top-level fields once each (a `Map` builds a B-tree of owned keys
/// to be looked up a few times and dropped). A repeated key stands as often as it was
/// sent (a reader takes the last, as a `Map` keeps).
pub(crate) struct Members<'de>(Vec<(Key<'de>, serde_json::Value)>);

impl<'de> Members<'de> {
    /// The members, in order.
    pub(crate) fn into_inner(self) -> Vec<(Key<'de>, serde_json::Value)> {
        self.0
    }
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members<'de>, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    out.push((k, map.next_value()?));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A token count from an upstream, read without trust: any JSON number, saturating
/// (negative → 0, past `u64::MAX` or a float → truncated and capped), or `null` (absent).
/// Anything else is an error, as for a `u64`.
pub(crate) struct Count(pub(crate) Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a token count")
            }
            fn visit_u64<E>(self, n: u64) -> Result<Count, E> {
                Ok(Count(Some(n)))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Count, E> {
                Ok(Count(Some(u64::try_from(n).unwrap_or(0))))
            }
            fn visit_f64<E>(self, n: f64) -> Result<Count, E> {
                // `as` saturates (NaN → 0); JSON has no NaN anyway.
                Ok(Count(Some(if n > 0.0 { n as u64 } else { 0 })))
            }
            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_none<E>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// What a [`Count`] field becomes: `0` or the value for a `u64`, as is for an `Option<u64>`.
pub(crate) trait FromCount {
    fn from_count(c: Option<u64>) -> Self;
}

impl FromCount for u64 {
    fn from_count(c: Option<u64>) -> Self {
        c.unwrap_or(0)
    }
}

impl FromCount for Option<u64> {
    fn from_count(c: Option<u64>) -> Self {
        c
    }
}

/// `Deserialize` for a struct whose named fields are read by key and whose other keys go to
/// its `extra` map: what `#[serde(flatten)] extra` does, without buffering every unknown
/// field into serde's intermediate `Content` and converting it again (the core serde
/// bench: a request with seven fields kept in `extra`, 18 800 → 15 700 instructions; one
/// without, 4 920 → 4 790). Field kinds: `required` (missing is an error),
/// `optional` (missing is `Default`), `nullable` (`Option<Option<T>>`: missing is `None`,
/// `null` is `Some(None)`), `skipped` (never read, `Default`), and optionally `counts`
/// (token counts from an upstream, read saturating through [`Count`]). A repeated named
/// field is an error, as with the derive.
macro_rules! deserialize_with_extra {
    (
        $ty:ident, $expecting:literal,
        required: [$($req:ident),* $(,)?],
        optional: [$($opt:ident),* $(,)?],
        nullable: [$($nul:ident),* $(,)?],
        skipped: [$($skip:ident),* $(,)?]
        $(, counts: [$($cnt:ident),* $(,)?])? $(,)?
    ) => {
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> Result<$ty, A::Error> {
                        use serde::de::Error as _;
                        $(let mut $req = None;)*
                        $(let mut $opt = None;)*
                        $(let mut $nul = None;)*
                        $($(let mut $cnt: Option<$crate::json::Count> = None;)*)?
                        let mut extra = $crate::Extra::new();
                        while let Some(key) = map.next_key::<$crate::json::Key<'de>>()? {
                            match key.as_str() {
                                $(stringify!($req) => {
                                    if $req.is_some() {
                                        return Err(A::Error::duplicate_field(stringify!($req)));
                                    }
                                    $req = Some(map.next_value()?);
                                })*
                                $(stringify!($opt) => {
                                    if $opt.is_some() {
                                        return Err(A::Error::duplicate_field(stringify!($opt)));
                                    }
                                    $opt = Some(map.next_value()?);
                                })*
                                $(stringify!($nul) => {
                                    if $nul.is_some() {
                                        return Err(A::Error::duplicate_field(stringify!($nul)));
                                    }
                                    $nul = Some(Some(map.next_value()?));
                                })*
                                $($(stringify!($cnt) => {
                                    if $cnt.is_some() {
                                        return Err(A::Error::duplicate_field(stringify!($cnt)));
                                    }
                                    $cnt = Some(map.next_value()?);
                                })*)?
                                _ => {
                                    let value = map.next_value()?;
                                    extra.insert(key.into_owned(), value);
                                }
                            }
                        }
                        Ok($ty {
                            $($req: $req.ok_or_else(|| A::Error::missing_field(stringify!($req)))?,)*
                            $($opt: $opt.unwrap_or_default(),)*
                            $($nul: $nul.unwrap_or_default(),)*
                            $($($cnt: $crate::json::FromCount::from_count(
                                $cnt.and_then(|c| c.0),
                            ),)*)?
                            extra,
                            $($skip: Default::default(),)*
                        })
                    }
                }
                d.deserialize_map(V)
            }
        }
    };
}
pub(crate) use deserialize_with_extra;

/// Calls `check` with every document one byte away from `seed` (deleted, replaced or
/// inserted, with the bytes that matter to JSON); returns how many there were.
#[cfg(test)]
pub(crate) fn one_byte_away(seed: &str, mut check: impl FnMut(&[u8])) -> usize {
    const BYTES: &[u8] = b"\"\\,:{}[]0-9.eEnu \x01a";
    let seed = seed.as_bytes();
    let mut n = 0;
    for i in 0..seed.len() {
        let mut d = seed.to_vec();
        d.remove(i);
        check(&d);
        n += 1;
        for &b in BYTES {
            let mut d = seed.to_vec();
            d[i] = b;
            check(&d);
            let mut d = seed.to_vec();
            d.insert(i, b);
            check(&d);
            n += 2;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_their_order_and_repeats() {
        let m: Members<'_> = from_slice(br#"{"b":1,"a":2,"b":3}"#).unwrap();
        let m = m.into_inner();
        let keys: Vec<&str> = m.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "a", "b"]);
        assert_eq!(m[2].1, serde_json::json!(3));
    }
}
