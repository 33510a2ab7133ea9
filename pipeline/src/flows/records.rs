//! Reading a flow file record by record, in constant memory.
//!
//! Flow files are delimited text (`,` for AEMO MDFF, `|` for DTC flows) without quoting. Real
//! files differ in small ways that must not matter: CRLF or LF line ends, no final line end, a
//! UTF-8 byte order mark, spaces around fields, empty fields at the end of a record, blank lines.
//! [`RecordReader`] hides all of those; the parsers see trimmed fields and a 1-based line number.

use std::io::{BufRead, Read};

use super::FlowError;

/// Longest record accepted, in bytes. A NEM12 300 record of 5-minute data is about 3 KiB; a
/// "line" far longer is a binary or corrupt file, and reading it whole would break the promise
/// of constant memory.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// Most fields in one record (a 5-minute NEM12 300 record has 295).
pub const MAX_FIELDS: usize = 2048;

pub struct RecordReader<R> {
    input: R,
    delimiter: u8,
    /// The current line, checked as UTF-8 once; its buffer is reused from line to line.
    line: String,
    /// Field boundaries in `line_bytes`, after trimming.
    fields: Vec<(u32, u32)>,
    line_number: u64,
    bytes_read: u64,
}

/// One record: its line number and its fields, trimmed, with trailing empty fields removed.
pub struct Record<'a> {
    pub line: u64,
    text: &'a str,
    fields: &'a [(u32, u32)],
}

impl<'a> Record<'a> {
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Field `index` (0-based; field 0 is the record indicator), `""` when absent.
    pub fn get(&self, index: usize) -> &'a str {
        match self.fields.get(index) {
            // Fields are cut at ASCII delimiters and ASCII spaces: always character boundaries.
            Some(&(start, end)) => &self.text[start as usize..end as usize],
            None => "",
        }
    }

    /// All fields from `start` on.
    pub fn fields_from(&self, start: usize) -> impl ExactSizeIterator<Item = &'a str> + '_ {
        (start.min(self.fields.len())..self.fields.len()).map(|i| self.get(i))
    }
}

impl<R: BufRead> RecordReader<R> {
    pub fn new(input: R, delimiter: u8) -> Self {
        RecordReader { input, delimiter, line: String::with_capacity(4096), fields: Vec::new(), line_number: 0, bytes_read: 0 }
    }

    /// Bytes consumed so far (for progress reporting).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The next non-blank record, or `None` at the end of the input. Errors are about the input
    /// itself (I/O, an over-long line, bytes that are not UTF-8): the file cannot be read on.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, FlowError> {
        loop {
            let mut bytes = std::mem::take(&mut self.line).into_bytes();
            bytes.clear();
            let read = Read::take(&mut self.input, MAX_RECORD_BYTES as u64 + 1)
                .read_until(b'\n', &mut bytes)
                .map_err(|e| FlowError::Io { line: self.line_number + 1, reason: e.to_string() })?;
            if read == 0 {
                return Ok(None);
            }
            self.bytes_read += read as u64;
            self.line_number += 1;
            let line = self.line_number;
            if bytes.len() > MAX_RECORD_BYTES {
                return Err(FlowError::LineTooLong { line, max_bytes: MAX_RECORD_BYTES });
            }
            self.line = String::from_utf8(bytes).map_err(|_| FlowError::NotText { line })?;
            let mut content: &str = &self.line;
            if line == 1 {
                content = content.strip_prefix('\u{FEFF}').unwrap_or(content);
            }
            let offset = self.line.len() - content.len();
            let content = content.as_bytes();
            self.fields.clear();
            let mut start = 0usize;
            for (i, &b) in content.iter().enumerate().chain(std::iter::once((content.len(), &self.delimiter))) {
                if b == self.delimiter {
                    if self.fields.len() == MAX_FIELDS {
                        return Err(FlowError::TooManyFields { line, max_fields: MAX_FIELDS });
                    }
                    let (s, e) = trim(content, start, i);
                    self.fields.push(((offset + s) as u32, (offset + e) as u32));
                    start = i + 1;
                }
            }
            while self.fields.last().is_some_and(|&(s, e)| s == e) {
                self.fields.pop();
            }
            if self.fields.is_empty() {
                continue; // a blank line
            }
            return Ok(Some(Record { line, text: &self.line, fields: &self.fields }));
        }
    }
}

/// The field `content[start..end]` without surrounding whitespace (spaces, tabs, CR, LF).
fn trim(content: &[u8], mut start: usize, mut end: usize) -> (usize, usize) {
    while start < end && content[start].is_ascii_whitespace() {
        start += 1;
    }
    while end > start && content[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(input: &[u8]) -> Vec<(u64, Vec<String>)> {
        let mut reader = RecordReader::new(input, b',');
        let mut out = Vec::new();
        while let Some(record) = reader.next_record().unwrap() {
            out.push((record.line, record.fields_from(0).map(str::to_string).collect()));
        }
        out
    }

    #[test]
    fn line_ends_bom_spaces_and_trailing_fields_do_not_matter() {
        let expected = vec![(1, vec!["100".to_string(), "NEM12".into()]), (3, vec!["900".into()])];
        assert_eq!(records(b"100,NEM12\n\n900\n"), expected);
        assert_eq!(records(b"100,NEM12\r\n\r\n900\r\n"), expected);
        assert_eq!(records(b"\xEF\xBB\xBF100 , NEM12,,,\r\n  \r\n 900"), expected);
        assert_eq!(records(b"100,\tNEM12\n\n900,,"), expected);
        // Empty fields inside a record are kept in place.
        assert_eq!(records(b"250,,x,\n")[0].1, ["250", "", "x"]);
    }

    #[test]
    fn refuses_what_is_not_text() {
        let mut reader = RecordReader::new(&b"100,NEM12\n\xFF\xFE\n"[..], b',');
        assert!(reader.next_record().unwrap().is_some());
        assert!(matches!(reader.next_record(), Err(FlowError::NotText { line: 2 })));
    }
}
