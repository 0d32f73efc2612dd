//! How a person gets into the levels of a run: an OpenSSH client configuration
//! with one `Host` per level (jumping through the levels above it, with the
//! run's key and each level's host key pinned) and the command that opens each
//! level's QEMU monitor. Written into the run folder for `--keep-failed`.
//!
//! Built from [`LevelAccess`] facts (checked where they entered, see
//! [`LevelAccess::check`]) by pure functions; only [`write`] touches files.

use std::path::{Path, PathBuf};

use super::ssh::sh_quote;
use crate::wire::{LevelAccess, Monitor, Reach};

/// The commands that reach one level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reached {
    /// Its level path.
    pub path: String,
    /// A command that opens a shell there, from the machine the run started on.
    pub shell: String,
    /// A command that opens its QEMU's human monitor, when it has one.
    pub monitor: Option<String>,
    /// Something a person should know (a host key ssh will ask about).
    pub note: Option<String>,
}

/// The `Host` name of a level in the run's configuration: its last part (`L2`).
fn alias(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The level path of the level that opened `path`.
fn opener(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(parent, _)| parent)
}

/// Quotes a path for ssh_config, where arguments may be double-quoted.
fn config_path(path: &Path) -> String {
    format!("\"{}\"", path.display())
}

/// The run's OpenSSH client configuration and `known_hosts` for `levels`
/// (L1 first), logging in with `key`; `pinned` is the run's `--ssh-known-hosts`
/// text, which SSH levels are checked against.
pub fn ssh_config(
    levels: &[LevelAccess],
    key: &Path,
    known_hosts: &Path,
    pinned: &str,
) -> (String, String) {
    let mut config = String::from(
        "# The levels of one matryoshka run, for `ssh -F <this file> L<n>`;\n\
         # each level jumps through the ones above it.\n",
    );
    let mut hosts = String::new();
    for level in levels {
        if level.reach == Reach::Local {
            continue;
        }
        config.push_str(&format!("\nHost {}\n", alias(&level.path)));
        match &level.reach {
            Reach::Vm { port, host_key } => {
                let key_alias = format!("matryoshka-{}", level.path.replace('/', "-"));
                config.push_str(&format!(
                    "    HostName 127.0.0.1\n    Port {port}\n    User root\n    HostKeyAlias {key_alias}\n"
                ));
                match host_key {
                    Some(key) => hosts.push_str(&format!("{key_alias} {key}\n")),
                    // It made its own key at boot: ssh shows it and asks.
                    None => config.push_str("    StrictHostKeyChecking ask\n"),
                }
            }
            Reach::Ssh { user, host, port } => {
                config.push_str(&format!(
                    "    HostName {host}\n    Port {port}\n    User {user}\n"
                ));
            }
            Reach::Local => {}
        }
        if let Some(jump) = jump_host(levels, &level.path) {
            config.push_str(&format!("    ProxyJump {jump}\n"));
        }
    }
    for line in pinned.lines() {
        let line = line.trim();
        if !line.is_empty() && !line.starts_with('#') {
            hosts.push_str(line);
            hosts.push('\n');
        }
    }
    config.push_str(&format!(
        "\nHost *\n    IdentityFile {}\n    IdentitiesOnly yes\n    UserKnownHostsFile {}\n    \
         StrictHostKeyChecking yes\n    LogLevel ERROR\n",
        config_path(key),
        config_path(known_hosts)
    ));
    (config, hosts)
}

/// The `Host` a level is reached through: the nearest level above it that is
/// not on the machine of its own opener (a local runtime shares it), if any.
fn jump_host<'a>(levels: &'a [LevelAccess], path: &str) -> Option<&'a str> {
    let mut up = opener(path);
    loop {
        let level = levels.iter().find(|l| l.path == up)?;
        if level.reach != Reach::Local {
            return Some(alias(&level.path));
        }
        up = opener(up);
    }
}

/// The commands that reach each of `levels`, with the configuration at `config`.
pub fn commands(levels: &[LevelAccess], config: &Path) -> Vec<Reached> {
    let ssh = format!("ssh -F {}", sh_quote(&config.display().to_string()));
    levels
        .iter()
        .map(|level| {
            // Where the level's opener runs commands: here, or over SSH.
            let at_opener = |command: String| match jump_host_or_self(levels, opener(&level.path)) {
                Some(host) => format!("{ssh} {host} {command}"),
                None => command,
            };
            let shell = match level.reach {
                Reach::Local => match jump_host_or_self(levels, &level.path) {
                    Some(host) => format!("{ssh} {host}"),
                    None => "(this machine)".to_string(),
                },
                _ => format!("{ssh} {}", alias(&level.path)),
            };
            let monitor = level.monitor.as_ref().map(|m| match m {
                Monitor::Socket { runtime, path } => {
                    at_opener(format!("{} monitor {}", sh_quote(runtime), sh_quote(path)))
                }
                Monitor::Libvirt { domain } => {
                    let hmp = "'info status'";
                    let hmp = if jump_host_or_self(levels, opener(&level.path)).is_some() {
                        format!("\"{hmp}\"")
                    } else {
                        hmp.to_string()
                    };
                    at_opener(format!(
                        "virsh -c qemu:///system qemu-monitor-command --hmp {} {hmp}",
                        sh_quote(domain)
                    ))
                }
            });
            let note = matches!(level.reach, Reach::Vm { host_key: None, .. }).then(|| {
                "it made its own host key at boot: ssh shows it and asks before trusting it"
                    .to_string()
            });
            Reached {
                path: level.path.clone(),
                shell,
                monitor,
                note,
            }
        })
        .collect()
}

/// The `Host` that runs commands at `path`: itself when it has sshd, else the
/// host it shares a machine with; `None` for the machine the run started on.
fn jump_host_or_self<'a>(levels: &'a [LevelAccess], path: &str) -> Option<&'a str> {
    match levels.iter().find(|l| l.path == path) {
        Some(level) if level.reach != Reach::Local => Some(alias(&level.path)),
        Some(_) => jump_host(levels, path),
        None => None,
    }
}

/// Writes `ssh_config` and `known_hosts` for `levels` into `run_dir` and returns
/// the commands that reach each level.
pub fn write(
    run_dir: &Path,
    levels: &[LevelAccess],
    key: &Path,
    pinned: &str,
) -> Result<(PathBuf, Vec<Reached>), String> {
    let config_file = run_dir.join("ssh_config");
    let hosts_file = run_dir.join("known_hosts");
    let (config, hosts) = ssh_config(levels, key, &hosts_file, pinned);
    let put = |path: &Path, text: &str| {
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    put(&config_file, &config)?;
    put(&hosts_file, &hosts)?;
    let commands = commands(levels, &config_file);
    Ok((config_file, commands))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY1: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOne";
    const KEY2: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITwo";

    fn vm(path: &str, port: u16, key: Option<&str>, monitor: Option<Monitor>) -> LevelAccess {
        LevelAccess {
            path: path.into(),
            reach: Reach::Vm {
                port,
                host_key: key.map(String::from),
            },
            monitor,
        }
    }

    fn socket(runtime: &str, path: &str) -> Option<Monitor> {
        Some(Monitor::Socket {
            runtime: runtime.into(),
            path: path.into(),
        })
    }

    #[test]
    fn a_vm_chain_jumps_level_by_level_with_pinned_keys() {
        let levels = [
            vm(
                "L0/L1",
                40022,
                Some(KEY1),
                socket("/usr/bin/matryoshka", "/run/r/L0-L1.monitor"),
            ),
            vm(
                "L0/L1/L2",
                41000,
                Some(KEY2),
                socket("/root/.cache/matryoshka/bin/m", "/tmp/x/L1-L2.monitor"),
            ),
        ];
        let (config, hosts) = ssh_config(
            &levels,
            Path::new("/run/r/id_ed25519"),
            Path::new("/run/r/known_hosts"),
            "",
        );
        assert_eq!(
            config,
            "# The levels of one matryoshka run, for `ssh -F <this file> L<n>`;\n\
             # each level jumps through the ones above it.\n\
             \nHost L1\n    HostName 127.0.0.1\n    Port 40022\n    User root\n    HostKeyAlias matryoshka-L0-L1\n\
             \nHost L2\n    HostName 127.0.0.1\n    Port 41000\n    User root\n    HostKeyAlias matryoshka-L0-L1-L2\n    ProxyJump L1\n\
             \nHost *\n    IdentityFile \"/run/r/id_ed25519\"\n    IdentitiesOnly yes\n    \
             UserKnownHostsFile \"/run/r/known_hosts\"\n    StrictHostKeyChecking yes\n    LogLevel ERROR\n"
        );
        assert!(!config.contains("StrictHostKeyChecking no"));
        assert_eq!(
            hosts,
            format!("matryoshka-L0-L1 {KEY1}\nmatryoshka-L0-L1-L2 {KEY2}\n")
        );
        let reached = commands(&levels, Path::new("/run/r/ssh_config"));
        assert_eq!(reached[0].shell, "ssh -F '/run/r/ssh_config' L1");
        assert_eq!(
            reached[0].monitor.as_deref(),
            Some("'/usr/bin/matryoshka' monitor '/run/r/L0-L1.monitor'")
        );
        assert_eq!(reached[1].shell, "ssh -F '/run/r/ssh_config' L2");
        assert_eq!(
            reached[1].monitor.as_deref(),
            Some(
                "ssh -F '/run/r/ssh_config' L1 '/root/.cache/matryoshka/bin/m' monitor '/tmp/x/L1-L2.monitor'"
            )
        );
        assert_eq!(reached[1].note, None);
    }

    #[test]
    fn an_ssh_host_keeps_its_user_and_pins_from_the_runs_known_hosts() {
        let levels = [
            LevelAccess {
                path: "L0/L1".into(),
                reach: Reach::Ssh {
                    user: "lab".into(),
                    host: "box.example".into(),
                    port: 2222,
                },
                monitor: None,
            },
            vm(
                "L0/L1/L2",
                41000,
                None,
                Some(Monitor::Libvirt {
                    domain: "matryoshka-L1-L2-7-0".into(),
                }),
            ),
        ];
        let (config, hosts) = ssh_config(
            &levels,
            Path::new("/k"),
            Path::new("/h"),
            "# pinned\n[box.example]:2222 ssh-ed25519 AAAA\n",
        );
        // Its own user, set before the `Host *` defaults (the first value wins).
        assert!(
            config.contains("Host L1\n    HostName box.example\n    Port 2222\n    User lab\n")
        );
        assert!(config.contains("    StrictHostKeyChecking ask\n    ProxyJump L1\n"));
        assert_eq!(hosts, "[box.example]:2222 ssh-ed25519 AAAA\n");
        let reached = commands(&levels, Path::new("/c"));
        assert_eq!(
            reached[1].monitor.as_deref(),
            Some(
                "ssh -F '/c' L1 virsh -c qemu:///system qemu-monitor-command --hmp 'matryoshka-L1-L2-7-0' \"'info status'\""
            )
        );
        assert!(reached[1].note.is_some());
    }

    #[test]
    fn levels_below_a_local_runtime_jump_from_its_opener() {
        let levels = [
            LevelAccess {
                path: "L0/L1".into(),
                reach: Reach::Local,
                monitor: None,
            },
            vm(
                "L0/L1/L2",
                41000,
                Some(KEY1),
                socket("/m", "/tmp/y/L1-L2.monitor"),
            ),
        ];
        let (config, _) = ssh_config(&levels, Path::new("/k"), Path::new("/h"), "");
        assert!(!config.contains("Host L1"), "{config}");
        assert!(!config.contains("ProxyJump"), "{config}");
        let reached = commands(&levels, Path::new("/c"));
        assert_eq!(reached[0].shell, "(this machine)");
        assert_eq!(reached[1].shell, "ssh -F '/c' L2");
        assert_eq!(
            reached[1].monitor.as_deref(),
            Some("'/m' monitor '/tmp/y/L1-L2.monitor'")
        );
    }
}
