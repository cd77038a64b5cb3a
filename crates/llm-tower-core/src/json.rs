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

/// A string (an object key, a role), borrowed from the input when it has no escapes
/// (serde's `Cow<str>` always allocates).
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

/// `Deserialize` for a struct whose named fields are read by key and whose other keys go to
/// its `extra` map: what `#[serde(flatten)] extra` does, without buffering every unknown
/// field into serde's intermediate `Content` and converting it again (the core serde
/// bench: a request with seven fields kept in `extra`, 18 800 → 15 700 instructions; one
/// without, 4 920 → 4 790). Field kinds: `required` (missing is an error),
/// `optional` (missing is `Default`), `nullable` (`Option<Option<T>>`: missing is `None`,
/// `null` is `Some(None)`), `skipped` (never read, `Default`). A repeated named field is an
/// error, as with the derive.
macro_rules! deserialize_with_extra {
    (
        $ty:ident, $expecting:literal,
        required: [$($req:ident),* $(,)?],
        optional: [$($opt:ident),* $(,)?],
        nullable: [$($nul:ident),* $(,)?],
        skipped: [$($skip:ident),* $(,)?] $(,)?
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
