//! Result tables and their renderings: the JSON envelope, CSV and NDJSON. Columns keep their order (the
//! JSON objects are written by hand so keys appear in the documented order, not alphabetically).

use serde_json::Value;

/// Named columns and rows of values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl Table {
    /// An empty table with these columns.
    pub fn new<S: Into<String>>(columns: impl IntoIterator<Item = S>) -> Table {
        Table {
            columns: columns.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends `row.len()` values as a JSON object to `out`.
    fn write_object(&self, row: &[Value], out: &mut String) {
        out.push('{');
        for (i, (name, v)) in self.columns.iter().zip(row).enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&Value::String(name.clone()).to_string());
            out.push(':');
            out.push_str(&v.to_string());
        }
        out.push('}');
    }

    /// `[{...},{...}]`.
    pub fn to_json(&self) -> String {
        let mut out = String::from("[");
        for (i, row) in self.rows.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            self.write_object(row, &mut out);
        }
        out.push(']');
        out
    }

    /// One JSON object per line.
    pub fn to_ndjson(&self) -> String {
        let mut out = String::new();
        for row in &self.rows {
            self.write_object(row, &mut out);
            out.push('\n');
        }
        out
    }

    /// RFC 4180 CSV with a header line.
    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        let line = |cells: &mut dyn Iterator<Item = String>, out: &mut String| {
            for (i, c) in cells.enumerate() {
                if i > 0 {
                    out.push(',');
                }
                if c.contains([',', '"', '\n', '\r']) {
                    out.push('"');
                    out.push_str(&c.replace('"', "\"\""));
                    out.push('"');
                } else {
                    out.push_str(&c);
                }
            }
            out.push_str("\r\n");
        };
        line(&mut self.columns.iter().cloned(), &mut out);
        for row in &self.rows {
            line(
                &mut row.iter().map(|v| match v {
                    Value::Null => String::new(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                }),
                &mut out,
            );
        }
        out
    }
}

/// The success envelope around an already-serialised payload, with optional extra top-level fields.
pub fn success(data_json: &str, extra: &[(&str, Value)]) -> String {
    let mut out = String::with_capacity(data_json.len() + 64);
    out.push_str("{\"status\":\"success\",\"data\":");
    out.push_str(data_json);
    out.push_str(",\"message\":null");
    for (k, v) in extra {
        out.push(',');
        out.push_str(&Value::String((*k).into()).to_string());
        out.push(':');
        out.push_str(&v.to_string());
    }
    out.push('}');
    out
}

/// The error envelope.
pub fn error(message: &str) -> String {
    format!(
        "{{\"status\":\"error\",\"data\":null,\"message\":{}}}",
        Value::String(message.into())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_in_column_order() {
        let mut t = Table::new(["z", "a"]);
        t.rows.push(vec![json!("x,\"y\""), json!(3)]);
        t.rows.push(vec![Value::Null, json!(true)]);
        assert_eq!(
            t.to_json(),
            r#"[{"z":"x,\"y\"","a":3},{"z":null,"a":true}]"#
        );
        assert_eq!(t.to_csv(), "z,a\r\n\"x,\"\"y\"\"\",3\r\n,true\r\n");
        assert_eq!(t.to_ndjson().lines().count(), 2);
        assert_eq!(
            success("[]", &[("total_count", json!(0))]),
            r#"{"status":"success","data":[],"message":null,"total_count":0}"#
        );
        assert_eq!(
            error("bad \"x\""),
            r#"{"status":"error","data":null,"message":"bad \"x\""}"#
        );
    }
}

/// What a handler produced, before rendering: a JSON payload for the envelope's `data`, or rows that may be
/// exported as CSV/NDJSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Serialised JSON for `data`.
    Data(String),
    /// Rows; `total_count` goes next to `data` (JSON) or into `X-Total-Count` (exports).
    Rows {
        table: Table,
        format: super::params::Format,
        total_count: Option<i64>,
    },
}
