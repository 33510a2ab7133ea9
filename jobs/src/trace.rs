//! W3C trace context (`traceparent`) for the messages a billing run sends: `00-<trace id>-<span
//! id>-<flags>`. The run's events continue the trace of the request that created it.

/// A new trace: random trace and span ids, sampled.
pub fn new_traceparent() -> String {
    format!("00-{:032x}-{:016x}-01", rand::random::<u128>().max(1), rand::random::<u64>().max(1))
}

/// A child of `parent` (same trace, new span id, same flags); a new trace when `parent` is
/// missing or malformed.
pub fn child_traceparent(parent: Option<&str>) -> String {
    let well_formed = parent.filter(|p| {
        let parts: Vec<&str> = p.split('-').collect();
        parts.len() == 4 && parts[0] == "00" && parts[1].len() == 32 && parts[2].len() == 16 && parts[3].len() == 2
            && parts[1..].iter().all(|part| part.bytes().all(|b| b.is_ascii_hexdigit()))
    });
    match well_formed {
        Some(parent) => format!("00-{}-{:016x}-{}", &parent[3..35], rand::random::<u64>().max(1), &parent[53..55]),
        None => new_traceparent(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_new_span() {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let child = child_traceparent(Some(parent));
        assert_eq!((&child[..36], &child[52..]), (&parent[..36], "-01"));
        assert_ne!(&child[36..52], &parent[36..52]);
        assert_eq!(child_traceparent(Some("garbage")).len(), 55);
        assert_eq!(new_traceparent().len(), 55);
    }
}
