//! How errors are shown in logs and messages: an error and its sources on
//! one line.

/// `err` and each of its sources, joined by `": "`.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
