//! MongoDB's connection errors sorted into [`Cause`]s (the words are in `crate::reach`), and
//! a quick TCP probe of the seed list so a closed port is reported at once, not after the
//! driver's server selection timeout.

use crate::reach::{io_cause, is_dns_text, is_tls_text, Cause};
use mongodb::error::{Error, ErrorKind};
use mongodb::options::ServerAddress;
use std::time::Duration;

/// MongoDB's error codes met while connecting.
const UNAUTHORIZED: i32 = 13;
const AUTHENTICATION_FAILED: i32 = 18;

/// Sort a driver error met while connecting or on a first command.
pub fn cause(e: &Error, timeout: Duration) -> Cause {
    match &*e.kind {
        ErrorKind::Authentication { .. } => Cause::AuthFailed,
        ErrorKind::Command(c) if c.code == AUTHENTICATION_FAILED => Cause::AuthFailed,
        ErrorKind::Command(c) if c.code == UNAUTHORIZED => Cause::NotAuthorized,
        ErrorKind::DnsResolve { .. } => Cause::HostUnknown,
        ErrorKind::InvalidTlsConfig { .. } => Cause::Tls,
        ErrorKind::Io(io) => io_cause(io, timeout),
        // Server selection gave up; its message carries what each server's check met.
        ErrorKind::ServerSelection { message, .. } => selection_cause(message, timeout),
        _ => text_cause(&e.to_string(), timeout),
    }
}

/// What a server selection timeout's topology description says went wrong.
fn selection_cause(message: &str, timeout: Duration) -> Cause {
    match text_cause(message, timeout) {
        Cause::Other => Cause::TimedOut(timeout),
        c => c,
    }
}

fn text_cause(text: &str, timeout: Duration) -> Cause {
    let t = text.to_ascii_lowercase();
    if t.contains("connection refused") {
        Cause::Refused
    } else if t.contains("scram") || t.contains("authentication failed") {
        Cause::AuthFailed
    } else if is_tls_text(&t) {
        Cause::Tls
    } else if is_dns_text(&t) {
        Cause::HostUnknown
    } else if t.contains("timed out") || t.contains("timeout") {
        Cause::TimedOut(timeout)
    } else {
        Cause::Other
    }
}

/// Whether every TCP seed of the connection string refuses a connection (`host:port` of
/// each, then): nothing listens there, and the driver would only say so after its server
/// selection timeout. Any other outcome (a host that answers, a timeout, a name that does not
/// resolve, a socket path, an SRV record) is left to the driver.
pub async fn all_refused(hosts: &[ServerAddress], timeout: Duration) -> Option<Vec<String>> {
    let mut refused = Vec::new();
    for host in hosts {
        let ServerAddress::Tcp { host, port } = host else {
            return None;
        };
        let addr = format!("{host}:{}", port.unwrap_or(27017));
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused.push(addr),
            _ => return None,
        }
    }
    (!refused.is_empty()).then_some(refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_messages_are_sorted() {
        let t = Duration::from_secs(10);
        let refused = "Server selection timeout: No available servers. Topology: { Type: Unknown, \
                       Servers: [ { Address: 127.0.0.1:1, Type: Unknown, Error: Kind: I/O error: \
                       Connection refused (os error 111), labels: {} } ] }";
        assert_eq!(selection_cause(refused, t), Cause::Refused);
        let scram =
            "Server selection timeout: ... Error: Kind: SCRAM failure: Authentication failed.";
        assert_eq!(selection_cause(scram, t), Cause::AuthFailed);
        assert_eq!(
            selection_cause("Server selection timeout: No available servers.", t),
            Cause::TimedOut(t)
        );
    }

    #[tokio::test]
    async fn a_closed_port_is_refused_at_once() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let hosts = [ServerAddress::Tcp {
            host: "127.0.0.1".into(),
            port: Some(port),
        }];
        let refused = all_refused(&hosts, Duration::from_secs(2)).await;
        assert_eq!(refused, Some(vec![format!("127.0.0.1:{port}")]));
    }
}
