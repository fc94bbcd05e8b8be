//! EDN: the reader for Jepsen/Knossos op maps, and the exporter.
//!
//! The reader covers the EDN a history holds: maps, vectors, lists, sets,
//! keywords, symbols, strings, integers, floats, `nil`, booleans,
//! characters, comments, `#_` discards and tagged values (the tag is
//! dropped). A file is either one op map per form (Knossos, Porcupine's KV
//! test data) or a single vector of op maps (Jepsen's `history.edn`).
//!
//! The exporter writes one op map per line with Jepsen's value shapes
//! (`:value 3` for a read, `[1 4]` for a cas), which Knossos and
//! `jepsen.history` read.

use std::fmt::Write as _;
use std::io::{self, Write};

use serde_json::{Map, Number, Value};

use super::jepsen_value;
use crate::history::{Op, OpType, Process};

/// One EDN value.
#[derive(Debug, Clone, PartialEq)]
pub enum Edn {
    Nil,
    Bool(bool),
    Integer(i64),
    Float(f64),
    String(String),
    /// Without the leading `:`.
    Keyword(String),
    Symbol(String),
    /// Vectors, lists and sets.
    Sequence(Vec<Edn>),
    Map(Vec<(Edn, Edn)>),
}

impl Edn {
    /// The JSON form: keywords and symbols become strings, map keys their
    /// text.
    pub fn to_json(&self) -> Value {
        match self {
            Edn::Nil => Value::Null,
            Edn::Bool(b) => Value::Bool(*b),
            Edn::Integer(n) => Value::from(*n),
            Edn::Float(x) => Number::from_f64(*x).map_or(Value::Null, Value::Number),
            Edn::String(s) | Edn::Keyword(s) | Edn::Symbol(s) => Value::String(s.clone()),
            Edn::Sequence(items) => Value::Array(items.iter().map(Edn::to_json).collect()),
            Edn::Map(entries) => {
                let mut object = Map::new();
                for (key, value) in entries {
                    let key = match key {
                        Edn::String(s) | Edn::Keyword(s) | Edn::Symbol(s) => s.clone(),
                        other => other.to_json().to_string(),
                    };
                    object.insert(key, value.to_json());
                }
                Value::Object(object)
            }
        }
    }

    /// `map[:name]`.
    pub fn get(&self, name: &str) -> Option<&Edn> {
        let Edn::Map(entries) = self else { return None };
        entries
            .iter()
            .find(|(key, _)| matches!(key, Edn::Keyword(k) if k == name))
            .map(|(_, value)| value)
    }

    /// The text of a keyword, symbol or string.
    pub fn name(&self) -> Option<&str> {
        match self {
            Edn::Keyword(s) | Edn::Symbol(s) | Edn::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Reads EDN forms one at a time.
pub struct Reader<'a> {
    text: &'a [u8],
    position: usize,
}

/// Bytes that end a symbol, keyword or number.
fn is_delimiter(byte: u8) -> bool {
    byte.is_ascii_whitespace() || b",()[]{}\";".contains(&byte)
}

impl<'a> Reader<'a> {
    pub fn new(text: &'a str) -> Reader<'a> {
        Reader {
            text: text.as_bytes(),
            position: 0,
        }
    }

    /// The next top-level form, or `None` at the end.
    pub fn next_form(&mut self) -> Result<Option<Edn>, String> {
        self.skip_blank()?;
        if self.position >= self.text.len() {
            return Ok(None);
        }
        self.form().map(Some)
    }

    fn line(&self) -> usize {
        1 + self.text[..self.position]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    fn error(&self, what: &str) -> String {
        format!("line {}: {what}", self.line())
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.position).copied()
    }

    /// Whitespace, commas, `;` comments and `#_` discarded forms.
    fn skip_blank(&mut self) -> Result<(), String> {
        while let Some(byte) = self.peek() {
            if byte.is_ascii_whitespace() || byte == b',' {
                self.position += 1;
            } else if byte == b';' {
                while self.peek().is_some_and(|b| b != b'\n') {
                    self.position += 1;
                }
            } else if self.text[self.position..].starts_with(b"#_") {
                self.position += 2;
                self.skip_blank()?;
                self.form()?;
            } else {
                break;
            }
        }
        Ok(())
    }

    fn form(&mut self) -> Result<Edn, String> {
        self.skip_blank()?;
        let byte = self
            .peek()
            .ok_or_else(|| self.error("unexpected end of input"))?;
        match byte {
            b'(' | b'[' => {
                self.position += 1;
                let close = if byte == b'(' { b')' } else { b']' };
                Ok(Edn::Sequence(self.items(close)?))
            }
            b'{' => {
                self.position += 1;
                self.map()
            }
            b'#' => self.dispatch(),
            b'"' => self.string().map(Edn::String),
            b'\\' => self.character(),
            b')' | b']' | b'}' => Err(self.error(&format!("unexpected `{}`", byte as char))),
            _ => self.atom(),
        }
    }

    fn items(&mut self, close: u8) -> Result<Vec<Edn>, String> {
        let mut items = Vec::new();
        loop {
            self.skip_blank()?;
            match self.peek() {
                Some(byte) if byte == close => {
                    self.position += 1;
                    return Ok(items);
                }
                Some(_) => items.push(self.form()?),
                None => return Err(self.error(&format!("missing `{}`", close as char))),
            }
        }
    }

    fn map(&mut self) -> Result<Edn, String> {
        let items = self.items(b'}')?;
        if items.len() % 2 != 0 {
            return Err(self.error("a map needs an even number of forms"));
        }
        let mut items = items.into_iter();
        let mut entries = Vec::new();
        while let (Some(key), Some(value)) = (items.next(), items.next()) {
            entries.push((key, value));
        }
        Ok(Edn::Map(entries))
    }

    /// `#{…}` sets, `#inst "…"` and other tagged values (tag dropped).
    fn dispatch(&mut self) -> Result<Edn, String> {
        self.position += 1;
        if self.peek() == Some(b'{') {
            self.position += 1;
            return Ok(Edn::Sequence(self.items(b'}')?));
        }
        self.atom()?; // the tag
        self.form()
    }

    fn string(&mut self) -> Result<String, String> {
        self.position += 1;
        let mut bytes = Vec::new();
        loop {
            let byte = self
                .peek()
                .ok_or_else(|| self.error("unterminated string"))?;
            self.position += 1;
            match byte {
                b'"' => break,
                b'\\' => {
                    let escaped = self
                        .peek()
                        .ok_or_else(|| self.error("unterminated string"))?;
                    self.position += 1;
                    match escaped {
                        b'n' => bytes.push(b'\n'),
                        b't' => bytes.push(b'\t'),
                        b'r' => bytes.push(b'\r'),
                        b'u' => {
                            let hex = self.text.get(self.position..self.position + 4);
                            let code = hex
                                .and_then(|hex| std::str::from_utf8(hex).ok())
                                .and_then(|hex| u32::from_str_radix(hex, 16).ok())
                                .and_then(char::from_u32)
                                .ok_or_else(|| self.error("bad \\u escape"))?;
                            self.position += 4;
                            bytes.extend(code.to_string().bytes());
                        }
                        other => bytes.push(other),
                    }
                }
                other => bytes.push(other),
            }
        }
        String::from_utf8(bytes).map_err(|_| self.error("string is not UTF-8"))
    }

    /// `\a`, `\newline`, `\space`: read as one-character strings.
    fn character(&mut self) -> Result<Edn, String> {
        self.position += 1;
        let start = self.position;
        self.position += 1;
        while self.peek().is_some_and(|b| !is_delimiter(b)) {
            self.position += 1;
        }
        let token = std::str::from_utf8(&self.text[start..self.position.min(self.text.len())])
            .map_err(|_| self.error("character is not UTF-8"))?;
        let text = match token {
            "newline" => "\n",
            "space" => " ",
            "tab" => "\t",
            other => other,
        };
        Ok(Edn::String(text.to_string()))
    }

    fn atom(&mut self) -> Result<Edn, String> {
        let start = self.position;
        while self.peek().is_some_and(|b| !is_delimiter(b)) {
            self.position += 1;
        }
        let token = std::str::from_utf8(&self.text[start..self.position])
            .map_err(|_| self.error("token is not UTF-8"))?;
        Ok(match token {
            "" => return Err(self.error("empty token")),
            "nil" => Edn::Nil,
            "true" => Edn::Bool(true),
            "false" => Edn::Bool(false),
            _ if token.starts_with(':') => Edn::Keyword(token[1..].to_string()),
            _ => number(token).unwrap_or_else(|| Edn::Symbol(token.to_string())),
        })
    }
}

fn number(token: &str) -> Option<Edn> {
    let digits = token.trim_start_matches(['-', '+']);
    if !digits.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let integer = token.strip_suffix('N').unwrap_or(token);
    if let Ok(n) = integer.parse::<i64>() {
        return Some(Edn::Integer(n));
    }
    let float = token.strip_suffix('M').unwrap_or(token);
    float.parse::<f64>().ok().map(Edn::Float)
}

/// Reads a history of EDN op maps.
pub fn read(text: &str) -> Result<Vec<Op>, String> {
    let mut reader = Reader::new(text);
    let mut forms = Vec::new();
    while let Some(form) = reader.next_form()? {
        forms.push(form);
    }
    if let [Edn::Sequence(items)] = forms.as_slice() {
        forms = items.clone();
    }
    forms
        .iter()
        .enumerate()
        .map(|(position, form)| {
            op_from_map(form, position).map_err(|why| format!("op {position}: {why}"))
        })
        .collect()
}

/// One Jepsen op map as an [`Op`].
pub fn op_from_map(map: &Edn, position: usize) -> Result<Op, String> {
    if !matches!(map, Edn::Map(_)) {
        return Err("not a map".to_string());
    }
    let process = match map.get("process") {
        Some(Edn::Integer(n)) if *n >= 0 => Process::Client(*n as u64),
        Some(Edn::Keyword(k)) if k == "nemesis" => Process::Nemesis,
        other => return Err(format!("bad :process {other:?}")),
    };
    let kind = match map.get("type").and_then(Edn::name) {
        Some("invoke") => OpType::Invoke,
        Some("ok") => OpType::Ok,
        Some("fail") => OpType::Fail,
        Some("info") => OpType::Info,
        other => return Err(format!("bad :type {other:?}")),
    };
    let f = map
        .get("f")
        .and_then(Edn::name)
        .ok_or("missing :f")?
        .to_string();
    let key = map.get("key").map(|key| match key.name() {
        Some(name) => name.to_string(),
        None => key.to_json().to_string(),
    });
    let integer = |name: &str| match map.get(name) {
        Some(Edn::Integer(n)) if *n >= 0 => Some(*n as u64),
        _ => None,
    };
    let (value, error) = jepsen_value(&f, kind, map.get("value").unwrap_or(&Edn::Nil));
    let error = error.or_else(|| {
        map.get("error").map(|e| {
            e.name()
                .map_or_else(|| e.to_json().to_string(), str::to_string)
        })
    });
    Ok(Op {
        index: integer("index").unwrap_or(position as u64),
        time: integer("time").unwrap_or(position as u64),
        process,
        kind,
        f,
        key,
        value,
        term: integer("term"),
        raft_index: integer("raft-index"),
        error,
    })
}

/// Writes `ops` as EDN op maps, one per line.
pub fn write(mut out: impl Write, ops: &[Op]) -> io::Result<()> {
    for op in ops {
        writeln!(out, "{}", op_to_edn(op))?;
    }
    Ok(())
}

/// One op as a Jepsen op map.
pub fn op_to_edn(op: &Op) -> String {
    let process = match op.process {
        Process::Client(n) => n.to_string(),
        Process::Nemesis => ":nemesis".to_string(),
    };
    let kind = match op.kind {
        OpType::Invoke => "invoke",
        OpType::Ok => "ok",
        OpType::Fail => "fail",
        OpType::Info => "info",
    };
    let mut text = format!(
        "{{:index {}, :time {}, :process {process}, :type :{kind}, :f {}",
        op.index,
        op.time,
        keyword_or_string(&op.f)
    );
    if let Some(key) = &op.key {
        let _ = write!(text, ", :key {}", edn_string(key));
    }
    let _ = write!(
        text,
        ", :value {}",
        json_to_edn(&jepsen_shape(&op.f, &op.value))
    );
    if let Some(term) = op.term {
        let _ = write!(text, ", :term {term}");
    }
    if let Some(raft_index) = op.raft_index {
        let _ = write!(text, ", :raft-index {raft_index}");
    }
    if let Some(error) = &op.error {
        let _ = write!(text, ", :error {}", edn_string(error));
    }
    text.push('}');
    text
}

/// Undoes [`jepsen_value`]: `{"value": V}` → `V` for reads and writes,
/// `{"from": A, "to": B}` → `[A B]` for cas.
fn jepsen_shape(f: &str, value: &Value) -> Value {
    let Some(object) = value.as_object() else {
        return value.clone();
    };
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    match (f, keys.as_slice()) {
        ("read" | "get" | "write" | "put" | "append", ["value"]) => object["value"].clone(),
        ("cas", ["from", "to"] | ["to", "from"]) => {
            Value::Array(vec![object["from"].clone(), object["to"].clone()])
        }
        _ => value.clone(),
    }
}

fn json_to_edn(value: &Value) -> String {
    match value {
        Value::Null => "nil".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => edn_string(s),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(json_to_edn).collect();
            format!("[{}]", items.join(" "))
        }
        Value::Object(object) => {
            let entries: Vec<String> = object
                .iter()
                .map(|(key, value)| format!("{} {}", keyword_or_string(key), json_to_edn(value)))
                .collect();
            format!("{{{}}}", entries.join(", "))
        }
    }
}

/// `:name` when `name` is a valid keyword, else a string.
fn keyword_or_string(name: &str) -> String {
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_?!*+.".contains(c));
    if valid {
        format!(":{name}")
    } else {
        edn_string(name)
    }
}

fn edn_string(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\t' => quoted.push_str("\\t"),
            '\r' => quoted.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(quoted, "\\u{:04x}", c as u32);
            }
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn read_one(text: &str) -> Edn {
        Reader::new(text)
            .next_form()
            .expect("parses")
            .expect("one form")
    }

    #[test]
    fn edn_forms_read_as_json() {
        let form = read_one(
            r#"{:a [1 -2 3.5 nil true], :b #{:x}, "c" (\z "q\"\n\u0041"), :d #inst "2020", #_ :gone :e 7N}"#,
        );
        assert_eq!(
            form.to_json(),
            json!({"a": [1, -2, 3.5, null, true], "b": ["x"], "c": ["z", "q\"\nA"], "d": "2020", "e": 7})
        );
    }

    #[test]
    fn a_vector_of_op_maps_or_one_map_per_line_reads_the_same() {
        let lines = "{:process 0, :type :invoke, :f :read, :value nil}\n\
                     ; a comment\n\
                     {:process 0, :type :ok, :f :read, :value 3}\n";
        let vector = format!("[{}]", lines.replace("; a comment\n", ""));
        let ops = read(lines).expect("lines");
        assert_eq!(read(&vector).expect("vector"), ops);
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[1].value, json!({"value": 3}));
        assert_eq!(ops[1].index, 1);
    }

    #[test]
    fn malformed_edn_and_op_maps_are_errors_that_say_where() {
        let unclosed = read("{:process 0, :type :invoke\n").expect_err("unclosed");
        assert!(unclosed.contains("line 2"), "{unclosed}");
        let untyped = read("{:process 0, :f :read}").expect_err("no type");
        assert!(untyped.contains(":type"), "{untyped}");
    }

    #[test]
    fn exported_ops_use_jepsen_value_shapes() {
        let op = Op {
            index: 4,
            time: 9,
            process: Process::Nemesis,
            kind: OpType::Info,
            f: "cas".into(),
            key: Some("k\"1".into()),
            value: json!({"from": 1, "to": 2}),
            term: Some(3),
            raft_index: None,
            error: Some("timed out".into()),
        };
        assert_eq!(
            op_to_edn(&op),
            r#"{:index 4, :time 9, :process :nemesis, :type :info, :f :cas, :key "k\"1", :value [1 2], :term 3, :error "timed out"}"#
        );
    }
}
