//! What a level knows for booting VM levels below it: the run's settings, the
//! folder for consoles and logs, and the SSH key the levels accept.

use std::path::PathBuf;
use std::sync::OnceLock;

use russh::keys::PrivateKey;

use crate::config::{SshSettings, VmSettings};

/// What a level knows for booting VM levels below it.
#[derive(Debug)]
pub struct VmContext {
    /// The run's settings, as handed to this level.
    pub settings: VmSettings,
    /// Image folder given on the command line (L0 only).
    pub image_dir: Option<PathBuf>,
    /// Where consoles and QEMU logs go.
    pub run_dir: RunDir,
    /// Where the KVM probe is remembered.
    pub memo_dir: Option<PathBuf>,
    key: OnceLock<Result<RunKey, String>>,
}

impl VmContext {
    /// A context for a level.
    pub fn new(
        settings: VmSettings,
        image_dir: Option<PathBuf>,
        run_dir: RunDir,
        memo_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            settings,
            image_dir,
            run_dir,
            memo_dir,
            key: OnceLock::new(),
        }
    }

    /// Makes the key in `path` (made there, mode 0600, when missing) the one
    /// VM levels accept in this run: a chain kept across runs accepts the key
    /// it was booted with, which stays beside its snapshot. Only before the
    /// first level boots; afterwards the key chosen then stays.
    pub fn use_key_file(&self, path: &std::path::Path) -> Result<(), String> {
        // Absolute: it is printed in commands run from anywhere.
        let path = std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let named = Some(path.display().to_string());
        if let Some(Ok(chosen)) = self.key.get() {
            return if chosen.path == named {
                Ok(())
            } else {
                Err("the run's key was chosen before".into())
            };
        }
        if !path.exists() {
            // Made once: of two runs making it at once, the second reads the first's.
            let key = RunKey::generate()?;
            match write_new_private(&path, key.private_key.as_deref().unwrap_or_default()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(format!(
                        "cannot write the run's key to {}: {e}",
                        path.display()
                    ));
                }
            }
        }
        crate::engine::secure_file(&path).map_err(|e| e.to_string())?;
        let private = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let key = RunKey::from_private(&private, named)?;
        self.key
            .set(Ok(key))
            .map_err(|_| "the run's key was chosen before".to_string())
    }

    /// The public line of the key VM levels accept, once one was chosen.
    pub fn key_line(&self) -> Option<String> {
        match self.key.get() {
            Some(Ok(key)) => Some(key.public_line.clone()),
            _ => None,
        }
    }

    /// The file of the key VM levels accept, once one was chosen and when it
    /// is in a file here.
    pub fn key_file(&self) -> Option<PathBuf> {
        match self.key.get() {
            Some(Ok(key)) => key.path.as_ref().map(PathBuf::from),
            _ => None,
        }
    }

    /// The key VM levels accept: below L0 the public half handed down; at L0 the
    /// one given with `--ssh-key`, or one made for this run and written beside the
    /// consoles for printed `ssh` commands (its private half never leaves L0).
    pub(super) fn run_key(&self, ssh: Option<&SshSettings>) -> Result<RunKey, String> {
        self.key
            .get_or_init(|| match ssh {
                Some(SshSettings {
                    public_key: Some(public_line),
                    key_path,
                    ..
                }) => Ok(RunKey {
                    private_key: None,
                    public_line: public_line.clone(),
                    path: key_path.clone(),
                }),
                Some(SshSettings {
                    private_key: Some(private),
                    key_path,
                    ..
                }) => RunKey::from_private(private, key_path.clone()),
                _ => {
                    let key = RunKey::generate()?;
                    let path = self.run_dir.path()?.join("id_ed25519");
                    write_private(&path, key.private_key.as_deref().unwrap_or_default())?;
                    Ok(RunKey {
                        path: std::path::absolute(&path)
                            .ok()
                            .map(|p| p.display().to_string()),
                        ..key
                    })
                }
            })
            .clone()
    }
}

/// Folder for consoles and QEMU logs of the levels booted from here.
#[derive(Debug)]
pub enum RunDir {
    /// A folder that is kept (L0: `target/matryoshka/<run>`).
    Kept(PathBuf),
    /// A temporary folder, made on first use and removed with the runtime.
    Temporary(OnceLock<Result<tempfile::TempDir, String>>),
}

impl RunDir {
    /// The folder, made if needed.
    pub fn path(&self) -> Result<PathBuf, String> {
        match self {
            Self::Kept(p) => {
                std::fs::create_dir_all(p)
                    .map_err(|e| format!("cannot create {}: {e}", p.display()))?;
                Ok(p.clone())
            }
            Self::Temporary(dir) => dir
                .get_or_init(|| {
                    tempfile::Builder::new()
                        .prefix("matryoshka-run.")
                        .tempdir()
                        .map_err(|e| format!("cannot create a folder for consoles: {e}"))
                })
                .as_ref()
                .map(|d| d.path().to_path_buf())
                .map_err(Clone::clone),
        }
    }
}

/// The SSH key VM levels accept.
#[derive(Clone)]
pub(super) struct RunKey {
    pub private_key: Option<String>,
    pub public_line: String,
    pub path: Option<String>,
}

impl std::fmt::Debug for RunKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunKey")
            .field("public_line", &self.public_line)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RunKey {
    fn from_private(openssh: &str, path: Option<String>) -> Result<Self, String> {
        let key = PrivateKey::from_openssh(openssh)
            .map_err(|e| format!("the run's SSH key is unusable: {e}"))?;
        let public_line = key
            .public_key()
            .to_openssh()
            .map_err(|e| format!("cannot encode the run's public key: {e}"))?;
        Ok(Self {
            private_key: Some(openssh.to_string()),
            public_line,
            path,
        })
    }

    pub fn generate() -> Result<Self, String> {
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
            .map_err(|e| format!("cannot read /dev/urandom for the run's key: {e}"))?;
        let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
        let mut key = PrivateKey::from(pair);
        key.set_comment("matryoshka-run");
        let private = key
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .map_err(|e| format!("cannot encode the run's key: {e}"))?;
        Self::from_private(&private, None)
    }
}

/// Writes `key` into a new file `path` (mode 0600); an existing one is an
/// `AlreadyExists` error.
fn write_new_private(path: &std::path::Path, key: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(key.as_bytes())?;
    file.sync_all()
}

fn write_private(path: &std::path::Path, key: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(key.as_bytes()))
        .map_err(|e| format!("cannot write the run's key to {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip() {
        let key = RunKey::generate().expect("a key");
        assert!(key.public_line.starts_with("ssh-ed25519 "), "{key:?}");
        let private = key
            .private_key
            .as_deref()
            .expect("a made key has its private half");
        let again = RunKey::from_private(private, None).expect("parses");
        assert_eq!(again.public_line, key.public_line);
    }
}
