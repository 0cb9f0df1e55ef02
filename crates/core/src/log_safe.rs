//! Strings that came from outside (a user name typed at login, a key in a request path, a URL an
//! operator configured) made safe to put in a log line.
//!
//! A log line is read by people and parsed by shippers. A string with a newline could forge a
//! second line, an escape sequence could repaint a terminal, and a megabyte "user name" would
//! bury everything else; a URL's query string or user info often carries a token. So: control
//! characters are escaped, the length is capped, and URLs lose their query and user info.

use std::fmt;

/// Characters of an outside string kept in a log line; the rest is cut and marked.
pub const LOG_STRING_LIMIT: usize = 128;

/// Displays an outside string escaped and capped: `%LogSafe(&name)` in a tracing field.
#[derive(Debug, Clone, Copy)]
pub struct LogSafe<'a>(pub &'a str);

impl fmt::Display for LogSafe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shown, c) in self.0.chars().enumerate() {
            if shown == LOG_STRING_LIMIT {
                return write!(f, "…[{} bytes]", self.0.len());
            }
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202e}') {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// A URL fit for a log line: scheme, host, port and path only (no user info, no query, no
/// fragment), itself escaped and capped. Text that does not parse as a URL is shown up to the
/// first `?` or `#` with anything before an `@` dropped.
pub fn url_for_log(url: &str) -> String {
    let without_query = url.split(['?', '#']).next().unwrap_or_default();
    let cleaned = match without_query.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => without_query
            .rsplit_once('@')
            .map_or(without_query, |(_, h)| h)
            .to_owned(),
    };
    LogSafe(&cleaned).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_length_is_capped() {
        assert_eq!(
            LogSafe("admin\nlevel=ERROR forged").to_string(),
            "admin\\nlevel=ERROR forged"
        );
        assert_eq!(LogSafe("\u{1b}[31mred").to_string(), "\\u{1b}[31mred");
        let long = "x".repeat(10_000);
        let shown = LogSafe(&long).to_string();
        assert!(shown.starts_with(&"x".repeat(LOG_STRING_LIMIT)));
        assert!(shown.ends_with("…[10000 bytes]"), "{shown}");
    }

    #[test]
    fn urls_lose_user_info_query_and_fragment() {
        assert_eq!(
            url_for_log("https://bob:s3cret@hooks.example.com:8443/in?token=abc#x"),
            "https://hooks.example.com:8443/in"
        );
        assert_eq!(
            url_for_log("ws://127.0.0.1:9000/feed?key=k"),
            "ws://127.0.0.1:9000/feed"
        );
        assert_eq!(url_for_log("user:pw@host/path?q"), "host/path");
    }
}
