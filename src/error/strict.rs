//! A JSON document read as a request body: a struct is only ever an object.
//!
//! serde's derived structs also accept a sequence, field by field in declaration order, and
//! serde_json offers it: `{"resources": [["contacts", "list"]]}` made a resource of the array,
//! `"destination_attributes": ["c1", "users"]` a destination, `"overrides": []` no overrides
//! (schemathesis, ST201: negative data accepted). The contract documents objects, so an array in
//! their place is bad input and must be refused with the field named, at any depth.
//!
//! [`Strict`] deserializes from a parsed [`Value`] exactly as serde_json's own `Value`
//! deserializer does, except that a struct asked of anything but an object is an "invalid type"
//! error. Every nested value is read through `Strict` again, so the rule holds all the way down.

use serde::de::{self, DeserializeSeed, IntoDeserializer, Unexpected, Visitor};
use serde_json::{Error, Value};

/// A deserializer over a parsed JSON value that refuses an array (or any non-object) for a struct.
pub struct Strict<'a>(pub &'a Value);

fn unexpected(v: &Value) -> Unexpected<'_> {
    match v {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Unexpected::Unsigned(u),
            (None, Some(i)) => Unexpected::Signed(i),
            _ => Unexpected::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

impl<'de> de::Deserializer<'de> for Strict<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_str(s),
            Value::Array(items) => {
                let mut seq = Seq {
                    items: items.iter(),
                    len: items.len(),
                };
                let out = visitor.visit_seq(&mut seq)?;
                // Like serde_json: a visitor that stops early (a fixed-size tuple) gets an error.
                match seq.items.len() {
                    0 => Ok(out),
                    _ => Err(de::Error::invalid_length(seq.len, &"fewer elements in array")),
                }
            }
            Value::Object(map) => visitor.visit_map(Entries {
                entries: map.iter(),
                value: None,
            }),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.0 {
            Value::Object(_) => self.deserialize_any(visitor),
            other => Err(de::Error::invalid_type(unexpected(other), &visitor)),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.0 {
            // A unit variant by its name.
            Value::String(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            // Any other variant as `{"name": content}`, as serde_json writes it.
            Value::Object(map) if map.len() == 1 => {
                let (name, content) = map.iter().next().expect("one entry");
                visitor.visit_enum(Variant { name, content })
            }
            other => Err(de::Error::invalid_type(
                unexpected(other),
                &"a string or an object of one key",
            )),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

struct Seq<'a> {
    items: std::slice::Iter<'a, Value>,
    len: usize,
}

impl<'de> de::SeqAccess<'de> for Seq<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        self.items.next().map(|v| seed.deserialize(Strict(v))).transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct Entries<'a> {
    entries: serde_json::map::Iter<'a>,
    value: Option<&'a Value>,
}

impl<'de> de::MapAccess<'de> for Entries<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        match self.entries.next() {
            Some((k, v)) => {
                self.value = Some(v);
                seed.deserialize(k.as_str().into_deserializer()).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        match self.value.take() {
            Some(v) => seed.deserialize(Strict(v)),
            None => Err(de::Error::custom("value asked before its key")),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

struct Variant<'a> {
    name: &'a String,
    content: &'a Value,
}

impl<'de, 'a> de::EnumAccess<'de> for Variant<'a> {
    type Error = Error;
    type Variant = Strict<'a>;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Strict<'a>), Error> {
        let name = seed.deserialize(self.name.as_str().into_deserializer())?;
        Ok((name, Strict(self.content)))
    }
}

impl<'de> de::VariantAccess<'de> for Strict<'_> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        match self.0 {
            Value::Null => Ok(()),
            other => Err(de::Error::invalid_type(unexpected(other), &"unit variant")),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_seq(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], visitor: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_struct(self, "", fields, visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        name: String,
        #[serde(default)]
        inner: Option<Inner>,
        #[serde(default)]
        list: Vec<Inner>,
        #[serde(default)]
        mode: Option<Mode>,
        #[serde(default)]
        n: Option<f64>,
        #[serde(default)]
        any: Option<Value>,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    struct Inner {
        a: String,
        #[serde(default)]
        b: Option<u32>,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        FailFast,
        Ignore,
    }

    fn read<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, String> {
        let v: Value = serde_json::from_str(json).unwrap();
        serde_path_to_error::deserialize(Strict(&v)).map_err(|e| format!("{}: {}", e.path(), e.inner()))
    }

    #[test]
    fn objects_read_as_serde_json_reads_them() {
        let o: Outer = read(
            r#"{"name":"x","inner":{"a":"y","b":3},"list":[{"a":"z"}],"mode":"fail_fast","n":2,"any":[1,{"k":null}]}"#,
        )
        .unwrap();
        assert_eq!(
            o.inner,
            Some(Inner {
                a: "y".into(),
                b: Some(3)
            })
        );
        assert_eq!(o.list, vec![Inner { a: "z".into(), b: None }]);
        assert_eq!(o.mode, Some(Mode::FailFast));
        assert_eq!(o.n, Some(2.0));
        assert_eq!(o.any, Some(serde_json::json!([1, {"k": null}])));
        let o: Outer = read(r#"{"name":"x","inner":null,"mode":"ignore"}"#).unwrap();
        assert_eq!((o.inner, o.mode), (None, Some(Mode::Ignore)));
    }

    #[test]
    fn a_struct_is_only_an_object_at_any_depth() {
        for (json, path) in [
            (r#"["x"]"#, "."),
            (r#"{"name":"x","inner":["y"]}"#, "inner"),
            (r#"{"name":"x","inner":[]}"#, "inner"),
            (r#"{"name":"x","list":[["y", 1]]}"#, "list[0]"),
            (r#"{"name":"x","inner":"y"}"#, "inner"),
        ] {
            let e = read::<Outer>(json).unwrap_err();
            assert!(e.starts_with(&format!("{path}: invalid type")), "{json}: {e}");
        }
        // Other type errors and unknown fields keep serde_json's wording and path.
        let e = read::<Outer>(r#"{"name":"x","inner":{"a":"y","b":-1}}"#).unwrap_err();
        assert_eq!(e, "inner.b: invalid value: integer `-1`, expected u32");
        let e = read::<Outer>(r#"{"name":"x","zzz":1}"#).unwrap_err();
        assert!(e.starts_with("zzz: unknown field `zzz`"), "{e}");
        let e = read::<Outer>(r#"{"name":"x","mode":"other"}"#).unwrap_err();
        assert!(e.starts_with("mode: unknown variant `other`"), "{e}");
        let e = read::<Outer>(r#"{"name":"x","mode":[]}"#).unwrap_err();
        assert!(e.starts_with("mode: invalid type: sequence"), "{e}");
    }

    /// JSON values of the shapes the test types meet: scalars, and arrays and objects (keys from
    /// the test types' field names, so some fit and some do not) nested a few levels.
    fn json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            prop_oneof![Just("x"), Just("y"), Just("fail_fast"), Just("ignore"), Just("other")]
                .prop_map(|s| Value::String(s.into())),
        ];
        let key = prop_oneof![
            Just("name"),
            Just("inner"),
            Just("list"),
            Just("mode"),
            Just("n"),
            Just("any"),
            Just("a"),
            Just("b"),
            Just("fail_fast"),
        ];
        leaf.prop_recursive(4, 40, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(key.clone(), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
            ]
        })
    }

    /// Objects shaped like `Outer` (a `name`, some of the other fields), with `Inner`-shaped or
    /// arbitrary values, so that many are taken and many are not.
    fn outer_like() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let inner = prop_oneof![
            (any::<u16>(), any::<bool>()).prop_map(|(b, with_b)| if with_b {
                serde_json::json!({"a": "y", "b": b})
            } else {
                serde_json::json!({"a": "y"})
            }),
            json(),
        ];
        let field = prop_oneof![
            inner.clone().prop_map(|v| ("inner", v)),
            proptest::collection::vec(inner, 0..3).prop_map(|v| ("list", Value::Array(v))),
            json().prop_map(|v| ("mode", v)),
            prop_oneof![Just(Value::from("fail_fast")), Just(Value::from("ignore"))].prop_map(|v| ("mode", v)),
            json().prop_map(|v| ("n", v)),
            json().prop_map(|v| ("any", v)),
        ];
        proptest::collection::vec(field, 0..4).prop_map(|fields| {
            let mut o = serde_json::Map::new();
            o.insert("name".into(), Value::from("x"));
            for (k, v) in fields {
                o.insert(k.into(), v);
            }
            Value::Object(o)
        })
    }

    /// Does `v` have an array (or any non-object) where `T` expects a struct? Answered by
    /// serde_json itself: the error of `Strict` says "invalid type" with a struct expected.
    fn refused_only_for_a_struct(e: &str) -> bool {
        e.contains("invalid type") && (e.contains("expected struct") || e.contains("a string or an object"))
    }

    #[test]
    fn reads_as_serde_json_does_except_structs_from_non_objects() {
        use proptest::test_runner::{Config, TestRunner};
        let mut runner = TestRunner::new(Config {
            cases: 2000,
            ..Config::default()
        });
        runner
            .run(&proptest::prop_oneof![json(), outer_like()], |v| {
                // A `Value` reads back as itself.
                let back: Value = serde_path_to_error::deserialize(Strict(&v))
                    .map_err(|e| proptest::test_runner::TestCaseError::fail(format!("Value refused: {e}")))?;
                proptest::prop_assert_eq!(&back, &v);
                // A struct: whatever `Strict` takes, serde_json takes the same way; whatever it
                // refuses that serde_json takes had a non-object where a struct goes.
                let loose = serde_json::from_value::<Outer>(v.clone()).map_err(|e| e.to_string());
                let strict = serde_path_to_error::deserialize::<_, Outer>(Strict(&v))
                    .map_err(|e| format!("{}: {}", e.path(), e.inner()));
                match (&loose, &strict) {
                    (Ok(a), Ok(b)) => proptest::prop_assert_eq!(a, b),
                    (Err(_), Ok(b)) => proptest::prop_assert!(false, "taken by Strict only: {v} -> {b:?}"),
                    (Ok(_), Err(e)) => {
                        proptest::prop_assert!(refused_only_for_a_struct(e), "{v}: refused with {e}")
                    }
                    (Err(_), Err(_)) => {}
                }
                Ok(())
            })
            .unwrap();
    }
}
