//! The client address of a request, as far as it can be believed.
//!
//! Behind a load balancer every connection comes from the balancer's address, so per-address
//! limits, dead letters, envelopes and the audit log would all name the balancer. The balancer
//! says who the client is in `Forwarded` (RFC 7239) or `X-Forwarded-For` / `X-Forwarded-Proto` /
//! `X-Forwarded-Host`, but anyone can send those headers, so they are read only when the TCP peer
//! is one of the operator's `--trusted-proxies`. The list of hops is then walked from the right
//! (the hop nearest to us) past every trusted proxy: the first address that is not a trusted
//! proxy is the client. A client cannot forge its way past that, since whatever it writes ends up
//! left of the hop our own proxy appended.
//!
//! Every HTTP server of iotgate runs [`attach`] first (an actix `wrap_fn`), which stores a
//! [`ClientInfo`] in the request; everything else reads it with [`client_info`].

use std::net::{IpAddr, SocketAddr};

use actix_web::dev::ServiceRequest;
use actix_web::http::header::HeaderMap;
use actix_web::HttpMessage as _;
use actix_web::HttpRequest;
use ipnet::IpNet;

/// The networks whose forwarding headers (and PROXY protocol headers) are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    networks: Vec<IpNet>,
}

/// Who is on the other end of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client's address. The port is 0 when a proxy named only the IP address.
    pub address: Option<SocketAddr>,
    /// The client reached us over HTTPS (our own TLS, or a trusted proxy that says so).
    pub https: bool,
    /// The host the client asked for, as a trusted proxy reports it (`X-Forwarded-Host`, or
    /// `host=` in `Forwarded`); the origin check of the admin API compares against it.
    pub forwarded_host: Option<String>,
}

impl ClientInfo {
    pub fn ip(&self) -> Option<IpAddr> {
        self.address.map(|a| a.ip())
    }
}

impl TrustedProxies {
    /// Parses CIDR blocks (`10.0.0.0/8`, `2001:db8::/32`) and single addresses (`127.0.0.1`).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut networks = Vec::new();
        for entry in entries {
            let entry = entry.as_ref().trim();
            if entry.is_empty() {
                continue;
            }
            let network = match entry.parse::<IpNet>() {
                Ok(network) => network,
                Err(_) => entry
                    .parse::<IpAddr>()
                    .map(IpNet::from)
                    .map_err(|_| format!("{entry} is neither an IP address nor a CIDR block"))?,
            };
            networks.push(network.trunc());
        }
        Ok(Self { networks })
    }

    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        self.networks.iter().any(|n| n.contains(&address))
    }

    /// The client behind `peer`, from the forwarding headers when `peer` is trusted. `tls` says
    /// whether the connection to us is itself TLS.
    pub fn resolve(&self, peer: Option<SocketAddr>, headers: &HeaderMap, tls: bool) -> ClientInfo {
        let untrusted = ClientInfo {
            address: peer,
            https: tls,
            forwarded_host: None,
        };
        let Some(peer) = peer else {
            return untrusted;
        };
        if !self.contains(peer.ip()) {
            return untrusted;
        }
        let hops = forwarded_hops(headers);
        if hops.is_empty() {
            return untrusted;
        }
        // Right to left, past every trusted proxy. A hop that names no usable address
        // ("unknown", an obfuscated name) ends the walk: the hop to its right is the last one
        // that can be named.
        let mut chosen: Option<usize> = None;
        let mut address = peer;
        for (index, hop) in hops.iter().enumerate().rev() {
            let Some(hop_address) = hop.address else {
                break;
            };
            address = hop_address;
            chosen = Some(index);
            if !self.contains(hop_address.ip()) {
                break;
            }
        }
        let proto = chosen
            .and_then(|i| hops[i].proto.clone())
            .or_else(|| hops.iter().rev().find_map(|h| h.proto.clone()));
        let host = chosen
            .and_then(|i| hops[i].host.clone())
            .or_else(|| hops.iter().find_map(|h| h.host.clone()));
        ClientInfo {
            address: Some(address),
            https: proto.map_or(tls, |p| p.eq_ignore_ascii_case("https")),
            forwarded_host: host,
        }
    }
}

/// Addresses compare in one form: an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what a
/// dual-stack socket reports) counts as the IPv4 address it maps.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// One hop a proxy recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Hop {
    address: Option<SocketAddr>,
    proto: Option<String>,
    host: Option<String>,
}

/// The hops of `Forwarded` if present, else of `X-Forwarded-For` (with `X-Forwarded-Proto` and
/// `X-Forwarded-Host` matched by position when they list as many values, else taken as a whole).
fn forwarded_hops(headers: &HeaderMap) -> Vec<Hop> {
    let joined = |name: &str| -> Option<String> {
        let values: Vec<&str> = headers
            .get_all(name)
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    };
    if let Some(forwarded) = joined("forwarded") {
        return forwarded
            .split(',')
            .map(|element| {
                let mut hop = Hop::default();
                for pair in element.split(';') {
                    let Some((name, value)) = pair.split_once('=') else {
                        continue;
                    };
                    let value = value.trim().trim_matches('"');
                    match name.trim().to_ascii_lowercase().as_str() {
                        "for" => hop.address = parse_node(value),
                        "proto" => hop.proto = Some(value.to_owned()),
                        "host" => hop.host = Some(value.to_owned()),
                        _ => {}
                    }
                }
                hop
            })
            .collect();
    }
    let Some(forwarded_for) = joined("x-forwarded-for") else {
        return Vec::new();
    };
    let list = |text: Option<String>| -> Vec<String> {
        text.map(|t| t.split(',').map(|v| v.trim().to_owned()).collect())
            .unwrap_or_default()
    };
    let protos = list(joined("x-forwarded-proto"));
    let hosts = list(joined("x-forwarded-host"));
    let addresses: Vec<&str> = forwarded_for.split(',').map(str::trim).collect();
    let count = addresses.len();
    addresses
        .into_iter()
        .enumerate()
        .map(|(i, address)| Hop {
            address: parse_node(address),
            proto: if protos.len() == count {
                Some(protos[i].clone())
            } else if i + 1 == count {
                protos.first().cloned()
            } else {
                None
            },
            host: if hosts.len() == count {
                Some(hosts[i].clone())
            } else if i + 1 == count {
                hosts.first().cloned()
            } else {
                None
            },
        })
        .collect()
}

/// `192.0.2.1`, `192.0.2.1:4711`, `[2001:db8::1]:4711` or `2001:db8::1`; port 0 when absent.
fn parse_node(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Some(SocketAddr::new(canonical(address.ip()), address.port()));
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(canonical(ip), 0))
}

/// Resolves and stores the client of a request; run first by every iotgate HTTP server.
pub fn attach(request: &ServiceRequest, proxies: &TrustedProxies, tls: bool) {
    let info = proxies.resolve(request.peer_addr(), request.headers(), tls);
    request.extensions_mut().insert(info);
}

/// The client of a request: what [`attach`] found, else the TCP peer.
pub fn client_info(request: &HttpRequest) -> ClientInfo {
    request
        .extensions()
        .get::<ClientInfo>()
        .cloned()
        .unwrap_or(ClientInfo {
            address: request.peer_addr(),
            https: false,
            forwarded_host: None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn peer(text: &str) -> Option<SocketAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8"]).unwrap();
        let info = proxies.resolve(
            peer("198.51.100.9:5000"),
            &headers(&[
                ("x-forwarded-for", "1.2.3.4"),
                ("x-forwarded-proto", "https"),
            ]),
            false,
        );
        assert_eq!(info.address, peer("198.51.100.9:5000"));
        assert!(!info.https);
    }

    #[test]
    fn the_right_most_untrusted_hop_wins() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8", "127.0.0.1"]).unwrap();
        // The client forged "6.6.6.6" in front; our edge proxy (10.0.0.5) appended the real one.
        let info = proxies.resolve(
            peer("127.0.0.1:40000"),
            &headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.0.0.5")]),
            false,
        );
        assert_eq!(info.address, peer("203.0.113.7:0"));
        // Every hop trusted: the left-most is as far as anyone can tell.
        let info = proxies.resolve(
            peer("127.0.0.1:40000"),
            &headers(&[("x-forwarded-for", "10.1.1.1, 10.0.0.5")]),
            false,
        );
        assert_eq!(info.address, peer("10.1.1.1:0"));
    }

    #[test]
    fn forwarded_takes_precedence_and_carries_port_proto_and_host() {
        let proxies = TrustedProxies::parse(&["127.0.0.0/8"]).unwrap();
        let info = proxies.resolve(
            peer("127.0.0.1:1"),
            &headers(&[
                (
                    "forwarded",
                    "for=\"[2001:db8::7]:4711\";proto=https;host=iot.example",
                ),
                ("x-forwarded-for", "9.9.9.9"),
            ]),
            false,
        );
        assert_eq!(info.address, peer("[2001:db8::7]:4711"));
        assert!(info.https);
        assert_eq!(info.forwarded_host.as_deref(), Some("iot.example"));
    }

    #[test]
    fn proto_follows_the_chosen_hop_or_the_single_value() {
        let proxies = TrustedProxies::parse(&["127.0.0.1"]).unwrap();
        let info = proxies.resolve(
            peer("127.0.0.1:1"),
            &headers(&[
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-proto", "https"),
            ]),
            false,
        );
        assert!(info.https);
        let info = proxies.resolve(
            peer("127.0.0.1:1"),
            &headers(&[("x-forwarded-for", "203.0.113.7")]),
            true,
        );
        assert!(
            info.https,
            "no proto header: the connection's own TLS counts"
        );
    }

    #[test]
    fn mapped_addresses_and_bad_entries() {
        let proxies = TrustedProxies::parse(&["127.0.0.1"]).unwrap();
        assert!(proxies.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(TrustedProxies::parse(&["not-an-address"]).is_err());
        let info = proxies.resolve(
            peer("127.0.0.1:1"),
            &headers(&[("x-forwarded-for", "unknown")]),
            false,
        );
        assert_eq!(info.address, peer("127.0.0.1:1"));
    }
}
