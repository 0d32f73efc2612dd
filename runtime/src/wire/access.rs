//! How a person reaches a level, as the relay carries it (`Ready{below}`):
//! plain data, checked where it enters ([`LevelAccess::check`]) before any of it
//! reaches a file or a terminal.

use serde::{Deserialize, Serialize};

/// How a person reaches a level from the level that opened it, for the
/// commands `--keep-failed` prints. Sent up the chain, so checked at L0
/// ([`LevelAccess::check`]) before any of it reaches a file or a terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LevelAccess {
    /// Its level path, e.g. `L0/L1/L2`.
    pub path: String,
    /// How its shell is reached.
    pub reach: Reach,
    /// Its QEMU's human monitor, at the level that opened it.
    pub monitor: Option<Monitor>,
}

/// How a level's shell is reached from the level that opened it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reach {
    /// A VM level: its sshd, forwarded to `port` on the opener's 127.0.0.1.
    Vm {
        /// The forwarded port.
        port: u16,
        /// Its SSH host key (`ssh-ed25519 AAAA…`), when the opener made it.
        host_key: Option<String>,
    },
    /// An SSH host, pinned in the run's `--ssh-known-hosts`.
    Ssh {
        /// User to log in as.
        user: String,
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A runtime on the opener's own machine.
    Local,
}

/// A QEMU human monitor (HMP) at the level that opened a VM level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Monitor {
    /// A Unix socket that `runtime monitor SOCKET` connects a terminal to.
    Socket {
        /// The opener's runtime binary.
        runtime: String,
        /// The socket.
        path: String,
    },
    /// A libvirt domain (`virsh qemu-monitor-command --hmp`).
    Libvirt {
        /// The domain's name.
        domain: String,
    },
}

impl LevelAccess {
    /// Refuses what a level below could not honestly have sent about `under`'s
    /// subtree: a path outside it, or text that would not stay one inert word
    /// in a file or on a terminal.
    pub fn check(&self, under: &str) -> Result<(), String> {
        if !is_below(&self.path, under) {
            return Err(format!("a level path {:?} outside {under}", self.path));
        }
        // Plain enough to pass through two shells (the printed command's and, for
        // a command run at a remote opener, sshd's) and ssh's `%` tokens as is.
        let word = |what: &str, s: &str| {
            let plain = !s.is_empty()
                && s.len() <= 4096
                && !s.starts_with('-')
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-/+@:".contains(&b));
            if plain {
                Ok(())
            } else {
                Err(format!(
                    "{what} {s:?} is not one plain word ([A-Za-z0-9._-/+@:])"
                ))
            }
        };
        match &self.reach {
            Reach::Vm { host_key, .. } => {
                if let Some(key) = host_key {
                    let mut parts = key.split(' ');
                    let ok = parts.next() == Some("ssh-ed25519")
                        && parts.next().is_some_and(|b| {
                            !b.is_empty()
                                && b.len() < 200
                                && b.bytes()
                                    .all(|c| c.is_ascii_alphanumeric() || b"+/=".contains(&c))
                        })
                        && parts.next().is_none();
                    if !ok {
                        return Err(format!(
                            "a host key {key:?} that is not an ed25519 public key"
                        ));
                    }
                }
            }
            Reach::Ssh { user, host, .. } => {
                word("user", user)?;
                word("host", host)?;
            }
            Reach::Local => {}
        }
        match &self.monitor {
            Some(Monitor::Socket { runtime, path }) => {
                word("runtime", runtime)?;
                word("monitor socket", path)?;
            }
            Some(Monitor::Libvirt { domain }) => word("domain", domain)?,
            None => {}
        }
        Ok(())
    }
}

/// `L` and a number of at most three digits: one part of a level path.
pub fn is_level_name(part: &str) -> bool {
    part.strip_prefix('L')
        .is_some_and(|n| !n.is_empty() && n.len() < 4 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `path` is a level path (`L0/L1/…`, each part [`is_level_name`])
/// strictly below `under`, in its subtree.
pub fn is_below(path: &str, under: &str) -> bool {
    path.strip_prefix(under)
        .is_some_and(|rest| rest.starts_with("/L"))
        && path.split('/').all(is_level_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_access_from_below_must_stay_in_its_subtree_and_be_plain() {
        let ok = LevelAccess {
            path: "L0/L1/L2".into(),
            reach: Reach::Vm {
                port: 4022,
                host_key: Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB+/=".into()),
            },
            monitor: Some(Monitor::Socket {
                runtime: "/root/.cache/matryoshka/bin/m".into(),
                path: "/tmp/matryoshka-run.x/L0-L1-L2.monitor".into(),
            }),
        };
        assert_eq!(ok.check("L0/L1"), Ok(()));
        let refused = |a: LevelAccess| a.check("L0/L1").expect_err("refused");
        for path in [
            "L0/L1",
            "L0/L2/L3",
            "L0/L1x/L2",
            "L0/L1/L2/../L3",
            "L0/L1/",
            "L0/L1/L2
",
        ] {
            refused(LevelAccess {
                path: path.into(),
                ..ok.clone()
            });
        }
        for key in [
            "ssh-rsa AAAA",
            "ssh-ed25519 AAAA\nHost *",
            "ssh-ed25519 AAAA extra",
            "ssh-ed25519 ",
        ] {
            refused(LevelAccess {
                reach: Reach::Vm {
                    port: 1,
                    host_key: Some(key.into()),
                },
                ..ok.clone()
            });
        }
        for word in [
            "a b",
            "a\nProxyCommand x",
            "\u{1b}[31m",
            "",
            "h';touch x'",
            "%d",
            "-oProxyCommand=x",
            "a\u{202e}b",
        ] {
            refused(LevelAccess {
                monitor: Some(Monitor::Libvirt {
                    domain: word.into(),
                }),
                ..ok.clone()
            });
            refused(LevelAccess {
                reach: Reach::Ssh {
                    user: word.into(),
                    host: "h".into(),
                    port: 22,
                },
                ..ok.clone()
            });
        }
    }
}
