//! Allowed origins of a server-mode listener: exact origins (`https://app.example.com`) or a
//! wildcard for the subdomains of one domain (`https://*.example.com`).
//!
//! Matching rules, written down in docs/API.md:
//! - scheme and host compare case-insensitively; the scheme must be the same;
//! - ports compare after filling in the scheme's default (80 for http/ws, 443 for https/wss), so
//!   `https://a.example.com` and `https://a.example.com:443` are the same origin;
//! - `*.` may only start the host and stands for one or more whole labels: `https://*.example.com`
//!   matches `https://a.example.com` and `https://a.b.example.com`, never `https://example.com`
//!   nor `https://badexample.com`;
//! - an origin has no path, query or user info; the browser's `null` origin never matches.

/// One allowed origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: String,
    host: HostPattern,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Exact(String),
    /// `.example.com`: the host must end with it and have something before it.
    SubdomainsOf(String),
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Splits `scheme://host[:port]` into its parts, lower-cased, with the default port filled in.
fn split(origin: &str) -> Result<(String, String, u16), &'static str> {
    let (scheme, rest) = origin
        .split_once("://")
        .ok_or("an origin looks like https://host[:port]")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return Err("the scheme is not valid");
    }
    if rest.contains(['/', '?', '#', '@']) {
        return Err("an origin has no path, query or user info");
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || rest.starts_with('[') => {
            let port: u16 = port
                .parse()
                .map_err(|_| "the port is not a number from 1 to 65535")?;
            if port == 0 {
                return Err("the port is not a number from 1 to 65535");
            }
            (host, port)
        }
        _ => (
            rest,
            default_port(&scheme)
                .ok_or("give the port for a scheme other than http(s) or ws(s)")?,
        ),
    };
    Ok((scheme, host.to_ascii_lowercase(), port))
}

impl OriginPattern {
    /// Reads an allowed-origin entry; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let (scheme, host, port) = split(text)?;
        let host = match host.strip_prefix("*.") {
            Some(domain) if valid_host(domain) => HostPattern::SubdomainsOf(format!(".{domain}")),
            Some(_) => {
                return Err("a wildcard must be followed by a domain, as in https://*.example.com")
            }
            None if host.contains('*') => {
                return Err("a wildcard may only start the host, as in https://*.example.com")
            }
            None if valid_host(&host) || (host.starts_with('[') && host.ends_with(']')) => {
                HostPattern::Exact(host)
            }
            None => return Err("the host is not valid"),
        };
        Ok(Self { scheme, host, port })
    }

    /// True for patterns with a wildcard.
    pub fn is_wildcard(&self) -> bool {
        matches!(self.host, HostPattern::SubdomainsOf(_))
    }

    /// Whether the `Origin` header value `origin` is allowed by this pattern.
    pub fn matches(&self, origin: &str) -> bool {
        let Ok((scheme, host, port)) = split(origin) else {
            return false;
        };
        if scheme != self.scheme || port != self.port {
            return false;
        }
        match &self.host {
            HostPattern::Exact(exact) => host == *exact,
            HostPattern::SubdomainsOf(suffix) => {
                host.strip_suffix(suffix.as_str()).is_some_and(valid_host)
            }
        }
    }
}

/// Whether `origin` is allowed by any of `patterns`.
pub fn origin_allowed(patterns: &[OriginPattern], origin: &str) -> bool {
    patterns.iter().any(|p| p.matches(origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(pattern: &str, origin: &str) -> bool {
        OriginPattern::parse(pattern).unwrap().matches(origin)
    }

    #[test]
    fn exact_origins_compare_case_insensitively_with_default_ports() {
        assert!(allowed(
            "https://App.Example.com",
            "https://app.example.com"
        ));
        assert!(allowed(
            "https://app.example.com",
            "https://app.example.com:443"
        ));
        assert!(allowed("http://localhost:3000", "http://localhost:3000"));
        assert!(!allowed("http://localhost:3000", "http://localhost:3001"));
        assert!(!allowed(
            "https://app.example.com",
            "http://app.example.com"
        ));
        assert!(!allowed("https://app.example.com", "null"));
        assert!(!allowed(
            "https://app.example.com",
            "https://app.example.com.evil.io"
        ));
    }

    #[test]
    fn wildcards_cover_subdomains_only() {
        assert!(allowed("https://*.example.com", "https://a.example.com"));
        assert!(allowed("https://*.example.com", "https://a.b.example.com"));
        assert!(!allowed("https://*.example.com", "https://example.com"));
        assert!(!allowed("https://*.example.com", "https://badexample.com"));
        assert!(!allowed("https://*.example.com", "https://.example.com"));
        assert!(!allowed(
            "https://*.example.com",
            "https://a.example.com:8443"
        ));
    }

    #[test]
    fn bad_patterns_say_why() {
        for bad in [
            "example.com",
            "https://example.com/path",
            "https://*",
            "https://a.*.example.com",
            "https://user@example.com",
            "https://example.com:0",
            "https://exa mple.com",
        ] {
            assert!(OriginPattern::parse(bad).is_err(), "{bad}");
        }
        assert!(OriginPattern::parse("https://*.example.com")
            .unwrap()
            .is_wildcard());
    }
}
