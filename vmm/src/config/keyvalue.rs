//! A serde deserializer for `key=value,key=value` option strings (the idea of crosvm's
//! `serde_keyvalue`; the crates.io crate of that name is unrelated).
//!
//! - A struct takes its fields from `key=value` items; a bare `key` is `key=true` (for
//!   booleans). With `#[serde(deny_unknown_fields)]`, an unknown key is an error naming it.
//! - An enum takes its variant from a leading bare word, and the variant's fields (a
//!   newtype variant around a struct) from the remaining items:
//!   `vfio-user,socket=/x` is `Device::VfioUser(VfioUser { socket: "/x".into(), .. })`.
//! - Values are strings, paths, integers (decimal or `0x` hex), booleans (`true`/`false`,
//!   `on`/`off`, `yes`/`no`) or `Option`s of those (a key given is `Some`). Values cannot
//!   contain commas. A key given twice is an error.
//!
//! The same types derive `Serialize`/`Deserialize`, so a configuration file or an API can
//! reuse them with another format.

use std::fmt;

use serde::de::{self, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess, VariantAccess};
use serde::forward_to_deserialize_any;

/// Why an option string does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyValueError(String);

impl de::Error for KeyValueError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        KeyValueError(msg.to_string())
    }
}

/// Parses `input` into a `T`.
pub fn from_key_values<'de, T: de::Deserialize<'de>>(input: &'de str) -> Result<T, KeyValueError> {
    let items = split(input)?;
    T::deserialize(Items { items, pos: 0 })
}

/// One comma-separated item: `key=value` or a bare `key`.
#[derive(Clone, Copy, Debug)]
struct Item<'de> {
    key: &'de str,
    value: Option<&'de str>,
}

/// Splits the input into items, refusing empty items and keys given twice.
fn split(input: &str) -> Result<Vec<Item<'_>>, KeyValueError> {
    if input.trim().is_empty() {
        return Err(KeyValueError("the option is empty".into()));
    }
    let mut items: Vec<Item<'_>> = Vec::new();
    for (n, raw) in input.split(',').enumerate() {
        let (key, value) = match raw.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v)),
            None => (raw.trim(), None),
        };
        if key.is_empty() {
            return Err(KeyValueError(format!(
                "item {} ('{raw}') has no key; use key=value items separated by commas",
                n + 1
            )));
        }
        if items.iter().any(|i| i.key == key) {
            return Err(KeyValueError(format!(
                "key '{key}' is given more than once"
            )));
        }
        items.push(Item { key, value });
    }
    Ok(items)
}

/// The items not consumed yet, deserialized as a struct or an enum.
struct Items<'de> {
    items: Vec<Item<'de>>,
    pos: usize,
}

impl<'de> de::Deserializer<'de> for Items<'de> {
    type Error = KeyValueError;

    fn deserialize_any<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_map(self)
    }

    fn deserialize_enum<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.items.get(self.pos) {
            Some(Item { value: None, .. }) => visitor.visit_enum(self),
            Some(Item {
                key,
                value: Some(_),
            }) => Err(KeyValueError(format!(
                "expected the type first ({}), found '{key}=...'",
                variants.join(", ")
            ))),
            None => Err(KeyValueError(format!(
                "expected the type ({})",
                variants.join(", ")
            ))),
        }
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

impl<'de> MapAccess<'de> for Items<'de> {
    type Error = KeyValueError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        match self.items.get(self.pos) {
            Some(item) => seed.deserialize(item.key.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let item = self
            .items
            .get(self.pos)
            .copied()
            .ok_or_else(|| KeyValueError("a value was asked for past the last item".into()))?;
        self.pos += 1;
        seed.deserialize(Value(item))
    }
}

impl<'de> EnumAccess<'de> for Items<'de> {
    type Error = KeyValueError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(
        mut self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), Self::Error> {
        let word = self.items[self.pos].key;
        self.pos += 1;
        let v = seed.deserialize(word.into_deserializer())?;
        Ok((v, self))
    }
}

impl<'de> VariantAccess<'de> for Items<'de> {
    type Error = KeyValueError;

    fn unit_variant(self) -> Result<(), Self::Error> {
        match self.items.get(self.pos) {
            None => Ok(()),
            Some(item) => Err(KeyValueError(format!(
                "unknown key '{}': this type takes no options",
                item.key
            ))),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, Self::Error> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: de::Visitor<'de>>(
        self,
        _len: usize,
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        Err(KeyValueError("tuple variants are not supported".into()))
    }

    fn struct_variant<V: de::Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_map(self)
    }
}

/// The value of one item, deserialized as whatever the field's type asks for.
struct Value<'de>(Item<'de>);

impl<'de> Value<'de> {
    fn text(&self, what: &str) -> Result<&'de str, KeyValueError> {
        self.0
            .value
            .ok_or_else(|| KeyValueError(format!("key '{}' needs a value ({what})", self.0.key)))
    }

    fn bad(&self, what: &str) -> KeyValueError {
        KeyValueError(format!(
            "invalid value '{}' for key '{}': expected {what}",
            self.0.value.unwrap_or(""),
            self.0.key
        ))
    }

    fn integer<T: TryFrom<i128>>(&self) -> Result<T, KeyValueError> {
        let what = "an integer";
        let t = self.text(what)?.trim();
        let (neg, digits) = match t.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, t),
        };
        let n = match digits
            .strip_prefix("0x")
            .or_else(|| digits.strip_prefix("0X"))
        {
            Some(hex) => i128::from_str_radix(hex, 16),
            None => digits.parse::<i128>(),
        }
        .map_err(|_| self.bad(what))?;
        let n = if neg { -n } else { n };
        T::try_from(n).map_err(|_| self.bad("an integer in range"))
    }
}

macro_rules! integer {
    ($($method:ident $visit:ident $t:ty),*) => {$(
        fn $method<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
            visitor.$visit(self.integer::<$t>()?)
        }
    )*};
}

impl<'de> de::Deserializer<'de> for Value<'de> {
    type Error = KeyValueError;

    fn deserialize_any<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0.value {
            Some(v) => visitor.visit_borrowed_str(v),
            None => visitor.visit_bool(true),
        }
    }

    fn deserialize_bool<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.0.value.map(str::trim) {
            None | Some("true" | "on" | "yes") => visitor.visit_bool(true),
            Some("false" | "off" | "no") => visitor.visit_bool(false),
            Some(_) => Err(self.bad("true or false")),
        }
    }

    integer! {
        deserialize_i8 visit_i8 i8, deserialize_i16 visit_i16 i16,
        deserialize_i32 visit_i32 i32, deserialize_i64 visit_i64 i64,
        deserialize_u8 visit_u8 u8, deserialize_u16 visit_u16 u16,
        deserialize_u32 visit_u32 u32, deserialize_u64 visit_u64 u64
    }

    fn deserialize_str<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_borrowed_str(self.text("a string")?)
    }

    fn deserialize_string<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: de::Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_enum(self.text("one of the listed words")?.into_deserializer())
    }

    forward_to_deserialize_any! {
        i128 u128 f32 f64 char bytes byte_buf unit unit_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Opts {
        path: PathBuf,
        name: Option<String>,
        count: Option<u32>,
        #[serde(default)]
        verbose: bool,
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Net {
        tap: String,
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(rename_all = "kebab-case")]
    enum Dev {
        DiskImage(Opts),
        Net(Net),
        Nothing,
    }

    fn err<T: std::fmt::Debug + for<'a> Deserialize<'a>>(s: &str) -> String {
        from_key_values::<T>(s).unwrap_err().to_string()
    }

    #[test]
    fn structs_take_every_field_type() {
        let o: Opts = from_key_values("path=/x/y,name=a b,count=0x10,verbose").unwrap();
        assert_eq!(
            o,
            Opts {
                path: "/x/y".into(),
                name: Some("a b".into()),
                count: Some(16),
                verbose: true
            }
        );
        let o: Opts = from_key_values("verbose=off,path=p").unwrap();
        assert_eq!((o.name, o.count, o.verbose), (None, None, false));
    }

    #[test]
    fn a_leading_word_selects_the_variant() {
        let d: Dev = from_key_values("disk-image,path=/d,count=3").unwrap();
        assert!(matches!(d, Dev::DiskImage(Opts { count: Some(3), .. })));
        assert_eq!(
            from_key_values::<Dev>("net,tap=tap0").unwrap(),
            Dev::Net(Net { tap: "tap0".into() })
        );
        assert_eq!(from_key_values::<Dev>("nothing").unwrap(), Dev::Nothing);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = err::<Opts>("path=/x,colour=red");
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = err::<Opts>("name=n");
        assert_eq!(e, "missing field `path`");
        let e = err::<Opts>("path=/x,count=ten");
        assert_eq!(
            e,
            "invalid value 'ten' for key 'count': expected an integer"
        );
        let e = err::<Opts>("path=/x,count=-1");
        assert_eq!(
            e,
            "invalid value '-1' for key 'count': expected an integer in range"
        );
        let e = err::<Opts>("path=/x,path=/y");
        assert_eq!(e, "key 'path' is given more than once");
        let e = err::<Opts>("path=/x,verbose=maybe");
        assert!(e.contains("expected true or false"), "{e}");
        let e = err::<Opts>("path");
        assert_eq!(e, "key 'path' needs a value (a string)");
        let e = err::<Opts>("path=/x,,name=a");
        assert!(e.contains("item 2"), "{e}");
        assert_eq!(err::<Opts>(""), "the option is empty");
    }

    #[test]
    fn enum_errors_list_the_types() {
        let e = err::<Dev>("floppy,path=/x");
        assert!(e.contains("unknown variant `floppy`"), "{e}");
        let e = err::<Dev>("path=/x");
        assert!(
            e.starts_with("expected the type first (disk-image, net, nothing)"),
            "{e}"
        );
        let e = err::<Dev>("net,tap=t,queues=2");
        assert!(e.contains("unknown field `queues`"), "{e}");
        let e = err::<Dev>("nothing,x=1");
        assert!(e.contains("unknown key 'x'"), "{e}");
    }

    #[test]
    fn the_same_types_serialize() {
        let d = Dev::Net(Net { tap: "t".into() });
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, r#"{"net":{"tap":"t"}}"#);
    }
}
