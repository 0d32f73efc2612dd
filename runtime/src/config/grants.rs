//! Grants: what a component may reach beyond logging, host facts, clocks and random.
//!
//! Deny by default. Grants come from `--grant` on the command line and from a
//! `matryoshka.toml` beside the component; both add up. A level never grants
//! more than its parent: the chain hands these same grants down unchanged.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What a grant string or a config file got wrong.
#[derive(Debug, Error)]
pub enum GrantError {
    /// A `--grant` value that is not one of the known forms.
    #[error(
        "unknown grant `{0}`: expected exec=CMD[,CMD...], fs=PATH[:GUEST_PATH][:ro|:rw], \
         image=PATH, nest, passthrough, qmp[=CMD,...] or libvirt[=URI,...]"
    )]
    Unknown(String),
    /// A grant of the right kind with an empty or bad value.
    #[error("bad grant `{grant}`: {reason}")]
    Invalid {
        /// The grant as written.
        grant: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The config file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML of the expected shape.
    #[error("invalid {path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The parser's message, which names the offending key.
        message: String,
    },
}

/// A directory the guest may open, at `guest` inside the component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsGrant {
    /// Directory on this level's filesystem.
    pub host: PathBuf,
    /// Where the guest sees it.
    pub guest: String,
    /// Whether the guest may write.
    pub writable: bool,
}

/// A grant given whole (`qmp`) or for some names only (`qmp=query-status,stop`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    /// Not granted.
    #[default]
    Denied,
    /// Granted for every name.
    All,
    /// Granted for these names only.
    Only(BTreeSet<String>),
}

impl Scope {
    /// Whether `name` is granted.
    pub fn allows(&self, name: &str) -> bool {
        match self {
            Self::Denied => false,
            Self::All => true,
            Self::Only(names) => names.contains(name),
        }
    }

    /// Whether anything is granted.
    pub fn any(&self) -> bool {
        !matches!(self, Self::Denied)
    }

    /// Grants every name.
    fn grant_all(&mut self) {
        *self = Self::All;
    }

    /// Grants `names` besides what is granted already.
    fn grant<I: IntoIterator<Item = String>>(&mut self, names: I) {
        let mut names = names.into_iter().peekable();
        if names.peek().is_none() {
            // `qmp = []` grants nothing.
            return;
        }
        match self {
            Self::All => {}
            Self::Denied => *self = Self::Only(names.collect()),
            Self::Only(have) => have.extend(names),
        }
    }
}

/// Everything granted to a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    /// Programs the `exec` host function may start, by `argv[0]` as the guest passes it.
    pub exec: BTreeSet<String>,
    /// Directories preopened for the guest.
    pub fs: Vec<FsGrant>,
    /// Whether the component may reach other levels (`nest` interface).
    pub nest: bool,
    /// Folders (absolute) under which a `vm-spec.image` may name an image to boot,
    /// besides the run's own image folder.
    pub images: Vec<PathBuf>,
    /// Whether the component may make SCSI disks (`scsi_debug`), list this level's
    /// SCSI devices and pass them to the levels it boots (`passthrough` interface).
    pub passthrough: bool,
    /// QMP commands the component may send to the QEMU of levels it booted.
    pub qmp: Scope,
    /// libvirt URIs the component may open.
    pub libvirt: Scope,
}

impl Grants {
    /// Whether `exec` may start `program`.
    pub fn allows_exec(&self, program: &str) -> bool {
        self.exec.contains(program)
    }

    /// Adds one `--grant` value.
    pub fn add(&mut self, grant: &str) -> Result<(), GrantError> {
        match grant {
            "nest" => self.nest = true,
            "passthrough" => self.passthrough = true,
            "qmp" => self.qmp.grant_all(),
            "libvirt" => self.libvirt.grant_all(),
            _ => return self.add_with_value(grant),
        }
        Ok(())
    }

    fn add_with_value(&mut self, grant: &str) -> Result<(), GrantError> {
        let invalid = |reason: &str| GrantError::Invalid {
            grant: grant.to_string(),
            reason: reason.to_string(),
        };
        let names = |list: &str, what: &str| -> Result<Vec<String>, GrantError> {
            let names: Vec<&str> = list.split(',').map(str::trim).collect();
            if names.iter().any(|c| c.is_empty()) {
                return Err(invalid(&format!("empty {what}")));
            }
            Ok(names.into_iter().map(String::from).collect())
        };
        match grant.split_once('=') {
            Some(("qmp", list)) => {
                self.qmp.grant(names(list, "QMP command name")?);
                Ok(())
            }
            Some(("libvirt", list)) => {
                self.libvirt.grant(names(list, "libvirt URI")?);
                Ok(())
            }
            Some(("exec", list)) => {
                let cmds: Vec<&str> = list.split(',').map(str::trim).collect();
                if cmds.iter().any(|c| c.is_empty()) {
                    return Err(invalid("empty command name"));
                }
                self.exec.extend(cmds.into_iter().map(String::from));
                Ok(())
            }
            Some(("fs", spec)) => {
                let fs = parse_fs(spec, None).map_err(|r| invalid(&r))?;
                self.fs.push(fs);
                Ok(())
            }
            Some(("image", dir)) => {
                let dir = image_dir(dir, None).map_err(|r| invalid(&r))?;
                self.images.push(dir);
                Ok(())
            }
            _ => Err(GrantError::Unknown(grant.to_string())),
        }
    }

    /// Adds the grants of a config file; relative paths are taken from its folder.
    pub fn merge_config(&mut self, path: &Path) -> Result<(), GrantError> {
        let text = std::fs::read_to_string(path).map_err(|source| GrantError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: ConfigFile = toml::from_str(&text).map_err(|e| GrantError::Config {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let grants = config.grants;
        self.nest |= grants.nest;
        self.passthrough |= grants.passthrough;
        for (scope, entry, key) in [
            (&mut self.qmp, grants.qmp, "qmp"),
            (&mut self.libvirt, grants.libvirt, "libvirt"),
        ] {
            match entry {
                None | Some(ScopeEntry::All(false)) => {}
                Some(ScopeEntry::All(true)) => scope.grant_all(),
                Some(ScopeEntry::Only(names)) => {
                    if names.iter().any(|n| n.trim().is_empty()) {
                        return Err(GrantError::Config {
                            path: path.to_path_buf(),
                            message: format!("grants.{key} has an empty name"),
                        });
                    }
                    scope.grant(names);
                }
            }
        }
        for cmd in grants.exec {
            if cmd.trim().is_empty() {
                return Err(GrantError::Config {
                    path: path.to_path_buf(),
                    message: "grants.exec has an empty command name".into(),
                });
            }
            self.exec.insert(cmd);
        }
        for entry in grants.fs {
            let bad = |message: String| GrantError::Config {
                path: path.to_path_buf(),
                message,
            };
            let fs = match entry {
                FsEntry::Short(spec) => parse_fs(&spec, Some(base)).map_err(bad)?,
                FsEntry::Full { host, guest, write } => {
                    let host = std::path::absolute(base.join(&host))
                        .map_err(|e| bad(format!("{}: {e}", host.display())))?;
                    let guest = guest.unwrap_or_else(|| host.display().to_string());
                    FsGrant {
                        host,
                        guest,
                        writable: write,
                    }
                }
            };
            self.fs.push(fs);
        }
        for dir in grants.images {
            let dir = image_dir(&dir, Some(base)).map_err(|message| GrantError::Config {
                path: path.to_path_buf(),
                message: format!("grants.images: {message}"),
            })?;
            self.images.push(dir);
        }
        Ok(())
    }
}

/// An image folder grant, made absolute (from `base` when given, else the
/// current folder).
fn image_dir(dir: &str, base: Option<&Path>) -> Result<PathBuf, String> {
    if dir.is_empty() {
        return Err("empty image folder".into());
    }
    let dir = match base {
        Some(base) => base.join(dir),
        None => PathBuf::from(dir),
    };
    std::path::absolute(&dir).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Parses `PATH[:GUEST_PATH][:ro|:rw]`.
fn parse_fs(spec: &str, base: Option<&Path>) -> Result<FsGrant, String> {
    let mut parts: Vec<&str> = spec.split(':').collect();
    let writable = match parts.last() {
        Some(&"rw") => {
            parts.pop();
            true
        }
        Some(&"ro") => {
            parts.pop();
            false
        }
        _ => false,
    };
    let (host, guest) = match parts.as_slice() {
        [host] if !host.is_empty() => (*host, None),
        [host, guest] if !host.is_empty() && guest.starts_with('/') => (*host, Some(*guest)),
        [_, _] => return Err("the guest path must be absolute".into()),
        _ => return Err("expected PATH[:GUEST_PATH][:ro|:rw]".into()),
    };
    let host = match base {
        Some(base) => base.join(host),
        None => PathBuf::from(host),
    };
    // Made absolute here, at L0: the grant travels down the chain and means the
    // same path at every level, not one relative to wherever a level runs.
    let host = std::path::absolute(&host).map_err(|e| format!("{}: {e}", host.display()))?;
    let guest = match guest {
        Some(g) => g.to_string(),
        None => host.display().to_string(),
    };
    Ok(FsGrant {
        host,
        guest,
        writable,
    })
}

/// The file `matryoshka.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    grants: GrantsSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantsSection {
    #[serde(default)]
    exec: Vec<String>,
    #[serde(default)]
    fs: Vec<FsEntry>,
    #[serde(default)]
    nest: bool,
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    passthrough: bool,
    qmp: Option<ScopeEntry>,
    libvirt: Option<ScopeEntry>,
}

/// `qmp = true` or `qmp = ["query-status", ...]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ScopeEntry {
    All(bool),
    Only(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
enum FsEntry {
    Short(String),
    Full {
        host: PathBuf,
        guest: Option<String>,
        #[serde(default)]
        write: bool,
    },
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    #[rstest]
    #[case("exec=uname", &["uname"])]
    #[case("exec=uname,lsblk, modprobe", &["lsblk", "modprobe", "uname"])]
    fn exec_grants(#[case] grant: &str, #[case] expected: &[&str]) {
        let mut g = Grants::default();
        g.add(grant).expect("valid grant");
        assert_eq!(
            g.exec.iter().map(String::as_str).collect::<Vec<_>>(),
            expected
        );
    }

    #[test]
    fn relative_fs_grants_are_made_absolute_where_they_are_given() {
        let mut g = Grants::default();
        g.add("fs=data:/data").expect("valid grant");
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(g.fs[0].host, cwd.join("data"));
        assert!(g.fs[0].host.is_absolute());
        g.add("fs=.").expect("valid grant");
        assert_eq!(g.fs[1].host, std::path::absolute(".").expect("absolute"));
        assert_eq!(g.fs[1].guest, g.fs[1].host.display().to_string());
    }

    #[rstest]
    #[case("fs=/srv", "/srv", "/srv", false)]
    #[case("fs=/srv:rw", "/srv", "/srv", true)]
    #[case("fs=/srv:/data", "/srv", "/data", false)]
    #[case("fs=/srv:/data:rw", "/srv", "/data", true)]
    #[case("fs=/srv:/data:ro", "/srv", "/data", false)]
    fn fs_grants(#[case] grant: &str, #[case] host: &str, #[case] guest: &str, #[case] rw: bool) {
        let mut g = Grants::default();
        g.add(grant).expect("valid grant");
        assert_eq!(
            g.fs,
            vec![FsGrant {
                host: host.into(),
                guest: guest.into(),
                writable: rw
            }]
        );
    }

    #[rstest]
    #[case("libvirt=", "bad grant `libvirt=`: empty libvirt URI")]
    #[case("qmp=stop,", "bad grant `qmp=stop,`: empty QMP command name")]
    #[case("passthrough=yes", "unknown grant `passthrough=yes`")]
    #[case("exec=", "bad grant `exec=`: empty command name")]
    #[case(
        "fs=/a:data",
        "bad grant `fs=/a:data`: the guest path must be absolute"
    )]
    #[case("nothing", "unknown grant `nothing`")]
    #[case("image=", "bad grant `image=`: empty image folder")]
    fn bad_grants(#[case] grant: &str, #[case] message: &str) {
        let err = Grants::default().add(grant).expect_err("invalid grant");
        assert!(err.to_string().starts_with(message), "{err}");
    }

    #[test]
    fn config_file_adds_grants_relative_to_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("matryoshka.toml");
        std::fs::write(
            &path,
            "[grants]\nexec = [\"uname\"]\nfs = [\"data:/data\", { host = \"out\", guest = \"/out\", write = true }]\n",
        )
        .expect("write config");
        let mut g = Grants::default();
        g.merge_config(&path).expect("valid config");
        assert!(g.allows_exec("uname"));
        assert_eq!(g.fs[0].host, dir.path().join("data"));
        assert_eq!(g.fs[0].guest, "/data");
        assert!(g.fs[1].writable);
    }

    #[test]
    fn image_grants_are_made_absolute() {
        let mut g = Grants::default();
        g.add("image=/srv/images").expect("valid grant");
        g.add("image=rel/images").expect("valid grant");
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(
            g.images,
            vec![PathBuf::from("/srv/images"), cwd.join("rel/images")]
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("matryoshka.toml");
        std::fs::write(&path, "[grants]\nimages = [\"imgs\", \"/abs\"]\n").expect("write config");
        let mut g = Grants::default();
        g.merge_config(&path).expect("valid config");
        assert_eq!(
            g.images,
            vec![dir.path().join("imgs"), PathBuf::from("/abs")]
        );
    }

    #[test]
    fn scoped_grants_are_denied_by_default_and_add_up() {
        let mut g = Grants::default();
        assert!(!g.qmp.any() && !g.libvirt.any() && !g.passthrough);
        g.add("qmp=query-status").expect("valid grant");
        g.add("qmp=device_add, device_del").expect("valid grant");
        assert!(g.qmp.allows("device_del") && !g.qmp.allows("migrate"));
        g.add("qmp").expect("valid grant");
        g.add("qmp=stop").expect("valid grant");
        assert!(g.qmp.allows("migrate"));
        g.add("libvirt=test:///default").expect("valid grant");
        assert!(g.libvirt.allows("test:///default") && !g.libvirt.allows("qemu:///system"));
        g.add("passthrough").expect("valid grant");
        assert!(g.passthrough);

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("matryoshka.toml");
        std::fs::write(
            &path,
            "[grants]\npassthrough = true\nqmp = [\"query-status\"]\nlibvirt = true\n",
        )
        .expect("write config");
        let mut g = Grants::default();
        g.merge_config(&path).expect("valid config");
        assert!(g.passthrough && g.libvirt.allows("qemu:///system"));
        assert_eq!(g.qmp, Scope::Only(["query-status".to_string()].into()));
    }

    #[test]
    fn config_file_rejects_unknown_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("matryoshka.toml");
        std::fs::write(&path, "[grants]\nexec = []\nnetwork = true\n").expect("write config");
        let err = Grants::default()
            .merge_config(&path)
            .expect_err("unknown key");
        assert!(err.to_string().contains("unknown field `network`"), "{err}");
    }
}
