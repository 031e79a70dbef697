//! qemu's JSON and human "dictionary dump" output.
//!
//! qemu builds its JSON from a `QDict`, a hash table of 512 buckets, and prints it bucket by
//! bucket; within a bucket the key inserted last comes first. The key order of
//! `qemu-img info --output=json` therefore looks random but is fixed: this module reproduces
//! it from the keys alone, given the objects are built in QAPI schema order (the order
//! qemu's visitors insert them).

use serde_json::{Map, Value};

/// Buckets in a qemu `QDict`.
const QDICT_BUCKETS: u32 = 512;

/// qemu's `tdb_hash`, the hash of a `QDict` key.
fn tdb_hash(name: &str) -> u32 {
    let mut value = 0x238F_13AFu32.wrapping_mul(name.len() as u32);
    for (i, c) in name.bytes().enumerate() {
        value = value.wrapping_add(u32::from(c) << (i * 5 % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

/// The entries of `map` in the order qemu prints a `QDict` built by inserting them in
/// `map`'s order.
pub fn qdict_order(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut entries: Vec<(usize, (&String, &Value))> = map.iter().enumerate().collect();
    entries.sort_by_key(|(i, (k, _))| (tdb_hash(k) % QDICT_BUCKETS, std::cmp::Reverse(*i)));
    entries.into_iter().map(|(_, e)| e).collect()
}

/// Pretty-prints `value` the way qemu's `qobject_to_json_pretty` does (4-space indent, empty
/// containers as `[` newline `]`), followed by a newline.
pub fn to_qemu_pretty(value: &Value) -> String {
    let mut out = String::new();
    write_value(value, 0, &mut out);
    out.push('\n');
    out
}

fn newline(out: &mut String, indent: usize) {
    out.push('\n');
    out.extend(std::iter::repeat_n(' ', indent * 4));
}

fn write_value(value: &Value, indent: usize, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => quote(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent + 1);
                write_value(item, indent + 1, out);
            }
            newline(out, indent);
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in qdict_order(map).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent + 1);
                quote(k, out);
                out.push_str(": ");
                write_value(v, indent + 1, out);
            }
            newline(out, indent);
            out.push('}');
        }
    }
}

/// Quotes a string like qemu: `\uXXXX` (upper-case hex) for control and non-ASCII
/// characters, surrogate pairs above U+FFFF.
fn quote(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (' '..'\u{7f}').contains(&c) => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
        }
    }
    out.push('"');
}

/// Prints an object the way qemu's human `info` dumps format-specific data: one
/// `key: value` line per entry (dashes in keys become spaces), nested objects and lists
/// indented by four spaces per level, list items as `[i]:`.
pub fn dump_human(map: &Map<String, Value>, indent: usize, out: &mut String) {
    for (k, v) in qdict_order(map) {
        let key = k.replace('-', " ");
        let pad = " ".repeat(indent * 4);
        match v {
            Value::Object(_) | Value::Array(_) => {
                out.push_str(&format!("{pad}{key}:\n"));
                dump_nested(v, indent + 1, out);
            }
            _ => out.push_str(&format!("{pad}{key}: {}\n", scalar(v))),
        }
    }
}

fn dump_nested(value: &Value, indent: usize, out: &mut String) {
    match value {
        Value::Object(map) => dump_human(map, indent, out),
        Value::Array(items) => {
            let pad = " ".repeat(indent * 4);
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::Object(_) | Value::Array(_) => {
                        out.push_str(&format!("{pad}[{i}]:\n"));
                        dump_nested(item, indent + 1, out);
                    }
                    _ => out.push_str(&format!("{pad}[{i}]: {}\n", scalar(item))),
                }
            }
        }
        _ => out.push_str(&scalar(value)),
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn orders_keys_like_qemu_info() {
        // Inserted in QAPI schema order; printed in qemu's observed order.
        let v = json!({
            "filename": "a", "format": "qcow2", "dirty-flag": false, "actual-size": 1,
            "virtual-size": 2, "cluster-size": 3, "encrypted": true, "backing-filename": "b",
            "full-backing-filename": "b", "backing-filename-format": "qcow2",
            "snapshots": [], "format-specific": {}, "children": []
        });
        let keys: Vec<&str> = qdict_order(v.as_object().unwrap())
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "children",
                "backing-filename-format",
                "snapshots",
                "virtual-size",
                "filename",
                "cluster-size",
                "format",
                "actual-size",
                "format-specific",
                "full-backing-filename",
                "encrypted",
                "backing-filename",
                "dirty-flag"
            ]
        );
    }

    #[test]
    fn pretty_prints_empty_containers_like_qemu() {
        let v = json!({"type": "file", "data": {}, "l": []});
        assert_eq!(
            to_qemu_pretty(&v),
            "{\n    \"l\": [\n    ],\n    \"type\": \"file\",\n    \"data\": {\n    }\n}\n"
        );
    }

    #[test]
    fn escapes_like_qemu() {
        let mut s = String::new();
        quote("a\"b\\c\u{1}é/", &mut s);
        assert_eq!(s, "\"a\\\"b\\\\c\\u0001\\u00E9/\"");
    }
}
