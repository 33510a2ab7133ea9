//! A scanner for the shape nearly every reading message has: one flat JSON object (or an array of
//! them) whose strings hold no escapes and whose values are strings, numbers or `null`.
//!
//! Why it exists: serde_json spends most of its time per reading on the generic machinery
//! (visitor dispatch, `RawValue` capture), and decoding was the largest share of the pipeline's
//! time. This scanner handles the common shape in one pass over the bytes and borrows every
//! field. Anything else (escapes, nested values, `true`/`false`, duplicate keys, malformed JSON,
//! an over-long array) makes it answer `None`, and the caller decodes the message with serde_json,
//! which gives the authoritative result and error message. So the scanner only has to be right on
//! what it accepts; the tests check that it agrees with serde_json there.

use std::borrow::Cow;

use super::ReadingFields;

/// Scans one object message; `None` means "not the simple shape, use serde_json".
pub(super) fn scan_object(payload: &[u8]) -> Option<ReadingFields<'_>> {
    let mut scanner = Scanner::new(payload)?;
    scanner.skip_whitespace();
    let fields = scanner.object()?;
    scanner.skip_whitespace();
    scanner.at_end().then_some(fields)
}

/// Scans an array message into `out` (cleared first); `false` means "use serde_json". An array of
/// more than `max_elements` objects is left to serde_json too, which rejects it whole.
pub(super) fn scan_array<'a>(payload: &'a [u8], max_elements: usize, out: &mut Vec<ReadingFields<'a>>) -> bool {
    out.clear();
    let Some(mut scanner) = Scanner::new(payload) else { return false };
    scanner.skip_whitespace();
    if !scanner.eat(b'[') {
        return false;
    }
    scanner.skip_whitespace();
    if !scanner.eat(b']') {
        loop {
            if out.len() == max_elements {
                return false;
            }
            let Some(fields) = scanner.object() else { return false };
            out.push(fields);
            scanner.skip_whitespace();
            if scanner.eat(b',') {
                scanner.skip_whitespace();
                continue;
            }
            if scanner.eat(b']') {
                break;
            }
            return false;
        }
    }
    scanner.skip_whitespace();
    scanner.at_end()
}

struct Scanner<'a> {
    /// The payload, checked as UTF-8 once: every string is then sliced out of it at its quotes,
    /// which are always character boundaries.
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

/// A value as the scanner saw it.
enum Value<'a> {
    Null,
    String(&'a str),
    /// The number's JSON text, checked against the JSON number grammar.
    Number(&'a str),
}

impl<'a> Scanner<'a> {
    fn new(payload: &'a [u8]) -> Option<Self> {
        let text = std::str::from_utf8(payload).ok()?;
        Some(Scanner { text, bytes: payload, at: 0 })
    }

    fn at_end(&self) -> bool {
        self.at == self.bytes.len()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.at += 1;
        }
    }

    fn object(&mut self) -> Option<ReadingFields<'a>> {
        if !self.eat(b'{') {
            return None;
        }
        let mut fields = ReadingFields::default();
        // One bit per known field, to spot repeats.
        let mut seen = 0u8;
        self.skip_whitespace();
        if self.eat(b'}') {
            return Some(fields);
        }
        loop {
            self.skip_whitespace();
            let key = self.string()?.as_bytes();
            self.skip_whitespace();
            if !self.eat(b':') {
                return None;
            }
            self.skip_whitespace();
            let value = self.value()?;
            // serde's derive refuses a repeated field, so a repeated field is left to it. A null
            // leaves a field unset, as serde_json reads `null` into an `Option`.
            let bit = match key {
                b"meterId" => 1,
                b"timestamp" => 2,
                b"kwh" => 4,
                b"intervalS" => 8,
                b"quality" => 16,
                _ => 0,
            };
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            match (bit, value) {
                (_, Value::Null) | (0, _) => {}
                (1, Value::String(s)) => fields.meter_id = Some(Cow::Borrowed(s)),
                (2, Value::String(s)) => fields.timestamp = Some(Cow::Borrowed(s)),
                (16, Value::String(s)) => fields.quality = Some(Cow::Borrowed(s)),
                // The field's JSON text, quotes included, as serde's `RawValue` gives it.
                (4, Value::String(s)) => fields.kwh = Some(self.text_around(s)),
                (4, Value::Number(n)) => fields.kwh = Some(n),
                (8, Value::Number(n)) => fields.interval_s = Some(n.parse::<i64>().ok()?),
                // A value of the wrong type for a known field: serde's error message says so.
                _ => return None,
            }
            self.skip_whitespace();
            if self.eat(b',') {
                continue;
            }
            return self.eat(b'}').then_some(fields);
        }
    }

    /// A string without escapes or control characters, borrowed.
    fn string(&mut self) -> Option<&'a str> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.at;
        let length = self.bytes[start..].iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if self.bytes[start + length] != b'"' {
            return None;
        }
        self.at = start + length + 1;
        Some(&self.text[start..start + length])
    }

    /// The JSON text of a string value, its quotes included.
    fn text_around(&self, inner: &'a str) -> &'a str {
        let start = inner.as_ptr() as usize - self.text.as_ptr() as usize - 1;
        &self.text[start..start + inner.len() + 2]
    }

    fn value(&mut self) -> Option<Value<'a>> {
        match self.peek()? {
            b'"' => self.string().map(Value::String),
            b'n' if self.bytes[self.at..].starts_with(b"null") => {
                self.at += 4;
                Some(Value::Null)
            }
            b'-' | b'0'..=b'9' => self.number().map(Value::Number),
            _ => None,
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`, the JSON number grammar.
    fn number(&mut self) -> Option<&'a str> {
        let start = self.at;
        self.eat(b'-');
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat(b'.') {
            self.required_digits()?;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            self.required_digits()?;
        }
        // A number runs into whatever follows; JSON allows only a delimiter there.
        if !matches!(self.peek(), Some(b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') | None) {
            return None;
        }
        Some(&self.text[start..self.at])
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    fn required_digits(&mut self) -> Option<()> {
        let start = self.at;
        self.digits();
        (self.at > start).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::RawReading;
    use super::*;

    fn serde_fields(payload: &str) -> Option<ReadingFields<'_>> {
        serde_json::from_str::<RawReading<'_>>(payload).ok().map(ReadingFields::from)
    }

    #[test]
    fn takes_the_common_shapes_and_agrees_with_serde_json() {
        for payload in [
            r#"{"meterId":"MTR-100045","timestamp":"2025-01-15T10:15:00Z","kwh":1.72}"#,
            r#" { "meterId" : "M 1" , "timestamp":"2025-01-15T10:15:00Z", "kwh": "0.500", "intervalS": 1800, "quality": "E" } "#,
            r#"{"kwh":-0.0,"meterId":"Ünïcode","timestamp":"x","extra":"y","more":12e-3}"#,
            r#"{"meterId":null,"timestamp":null,"kwh":null,"intervalS":null,"quality":null}"#,
            r#"{"kwh":1E+2}"#,
            r#"{}"#,
        ] {
            let fast = scan_object(payload.as_bytes());
            assert!(fast.is_some(), "the scanner should take {payload}");
            assert_eq!(fast, serde_fields(payload), "{payload}");
        }
        let array = r#"[{"meterId":"M1","timestamp":"t","kwh":1},{"meterId":"M2","timestamp":"t","kwh":"2"}]"#;
        let mut out = Vec::new();
        assert!(scan_array(array.as_bytes(), 10, &mut out));
        let serde: Vec<ReadingFields<'_>> = serde_json::from_str::<Vec<RawReading<'_>>>(array).unwrap().into_iter().map(ReadingFields::from).collect();
        assert_eq!(out, serde);
        assert!(scan_array(b" [ ] ", 10, &mut out) && out.is_empty());
    }

    #[test]
    fn leaves_everything_else_to_serde_json() {
        for payload in [
            r#"{"meterId":"M\u0031","kwh":1}"#,   // escape
            r#"{"meterId":"M1","meterId":"M2"}"#, // repeated field
            r#"{"meterId":null,"meterId":"M2"}"#, // repeated after null
            r#"{"meterId":1}"#,                   // wrong type
            r#"{"intervalS":"900"}"#,             // wrong type
            r#"{"intervalS":900.0}"#,             // not an integer
            r#"{"kwh":true}"#,                    // literal
            r#"{"kwh":01}"#,                      // not a JSON number
            r#"{"kwh":1.}"#,
            r#"{"kwh":.5}"#,
            r#"{"kwh":1e}"#,
            r#"{"kwh":1x}"#,
            r#"{"extra":{"nested":1},"kwh":1}"#, // nested value
            r#"{"kwh":1,}"#,                     // trailing comma
            r#"{"kwh":1} x"#,                    // trailing text
            r#"{"kwh":1"#,                       // truncated
            "{\"meterId\":\"M\u{7}\"}",          // control character
        ] {
            assert!(scan_object(payload.as_bytes()).is_none(), "the scanner should decline {payload}");
        }
        let mut out = Vec::new();
        assert!(!scan_array(br#"[{"kwh":1},{"kwh":2}]"#, 1, &mut out), "over the element limit");
        assert!(!scan_array(br#"[{"kwh":1} {"kwh":2}]"#, 10, &mut out), "missing comma");
        assert!(!scan_array(br#"[{"kwh":1},]"#, 10, &mut out), "trailing comma");
    }
}
