//! SSH targets and pinned host keys: a server's key must match a `known_hosts`
//! entry the run was given, never learned on first use.

use russh::keys::PublicKey;

/// `user@host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// Login name.
    pub user: String,
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl SshTarget {
    /// Parses the part after `ssh://`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (user, rest) = spec.split_once('@').ok_or_else(|| {
            format!("`ssh://{spec}` has no user: expected ssh://user@host[:port]")
        })?;
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("bad port `{p}` in ssh://{spec}"))?,
            ),
            None => (rest, 22),
        };
        if user.is_empty() || host.is_empty() {
            return Err(format!("`ssh://{spec}`: expected ssh://user@host[:port]"));
        }
        Ok(Self {
            user: user.into(),
            host: host.trim_start_matches('[').trim_end_matches(']').into(),
            port,
        })
    }

    /// The name `known_hosts` lists it under: `host`, or `[host]:port` off port 22.
    pub fn known_hosts_name(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }
}

/// Whether `key` is pinned for `target` in `known_hosts` (OpenSSH format, plain host names).
pub fn is_pinned(known_hosts: &str, target: &SshTarget, key: &PublicKey) -> bool {
    let name = target.known_hosts_name();
    known_hosts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (Some(hosts), Some(algo), Some(b64)) = (fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        hosts.split(',').any(|h| h == name)
            && PublicKey::from_openssh(&format!("{algo} {b64}"))
                .is_ok_and(|pinned| pinned.key_data() == key.key_data())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = SshTarget::parse("root@127.0.0.1:2222").expect("valid");
        assert_eq!(
            (t.user.as_str(), t.host.as_str(), t.port),
            ("root", "127.0.0.1", 2222)
        );
        assert_eq!(t.known_hosts_name(), "[127.0.0.1]:2222");
        let t = SshTarget::parse("me@lab").expect("valid");
        assert_eq!(t.port, 22);
        assert_eq!(t.known_hosts_name(), "lab");
        assert!(SshTarget::parse("lab").is_err());
        assert!(SshTarget::parse("me@lab:x").is_err());
    }
}
