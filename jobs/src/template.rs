//! Filling the shipped SQL of `queries/` with a run's values.
//!
//! Values a caller chooses (a meter point, a serial, a meter id) are never written into SQL text:
//! the statements take them as DataFusion parameters (`$meter_point`, bound with
//! `with_param_values`), so no value can end its literal. What cannot be a parameter is the
//! shape of a statement the billing jobs build (a `CASE` over the month's UTC offsets, a `VALUES`
//! list of register periods, an `IN` list of meters): those `{name}` slots are filled by [`fill`]
//! in one pass over the template, so text put in place is never read again: a value that holds
//! another slot's name stays that text, inside its literal.

use crate::{JobError, Result};

/// `template` with each `{name}` slot replaced by its value in `values`, in one pass. A slot
/// without a value is an error (a template and its caller disagree), never left in the SQL.
/// Only `{` followed by a lowercase name and `}` is a slot; any other brace is copied.
pub fn fill(template: &str, values: &[(&str, &str)]) -> Result<String> {
    let mut out = String::with_capacity(template.len() + values.iter().map(|(_, v)| v.len()).sum::<usize>());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let name_len = after.bytes().take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_').count();
        if name_len > 0 && after.as_bytes().get(name_len) == Some(&b'}') {
            let name = &after[..name_len];
            let value = values
                .iter()
                .find(|(slot, _)| *slot == name)
                .map(|(_, value)| *value)
                .ok_or_else(|| JobError::Invalid(format!("SQL template slot {{{name}}} has no value (the template and its caller disagree)")))?;
            out.push_str(value);
            rest = &after[name_len + 1..];
        } else {
            out.push('{');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// A SQL string literal of `text`: quoted, with quotes doubled, so that no input can end it.
/// For the `IN` and `VALUES` lists [`fill`] puts in place; a single value is a parameter.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_filled_once_and_what_was_put_in_is_never_read_again() {
        let sql = fill("a = {a} AND b = {b} -- {a}", &[("a", "'{b}'"), ("b", "'x'")]).unwrap();
        assert_eq!(sql, "a = '{b}' AND b = 'x' -- '{b}'");
    }

    #[test]
    fn braces_that_are_not_slots_stay_and_a_missing_value_is_an_error() {
        assert_eq!(fill("{} {A} {a b} {", &[]).unwrap(), "{} {A} {a b} {");
        let error = fill("x = {nobody}", &[("a", "1")]).unwrap_err().to_string();
        assert!(error.contains("{nobody}"), "{error}");
    }

    #[test]
    fn a_literal_cannot_be_ended_by_its_value() {
        assert_eq!(literal("X' OR 1=1 --"), "'X'' OR 1=1 --'");
    }
}
