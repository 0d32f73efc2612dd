//! The shell scripts an SSH level runs before its runtime, and what their
//! answers mean. Built and read by pure functions; `mod.rs` runs them.
//!
//! The remote cache holds native code the login user runs, so (as for the
//! local cache, see [`crate::engine::secure_dir`]) a runtime there is started
//! only when the cache folder and its `bin/` are owned by the login user and
//! writable by neither group nor others, and a runtime is put there only after
//! its sha256 matched the one it was sent as.

use crate::level::replicate::Codec;

/// What the first line of the first exec says when the runtime is not cached.
pub(super) const PROBE_MARK: &str = "MATRYOSHKA-PROBE";
/// The probe's last line when it goes on to take the runtime on its stdin,
/// followed by the suffix of the codec it unpacks (`.zst`, `.gz`).
pub(super) const RECEIVING_MARK: &str = "MATRYOSHKA-RECEIVING";
/// The probe's line before the cache folders that others could write to.
const UNSAFE_MARK: &str = "MATRYOSHKA-UNSAFE";
/// The upload's answer when the target has no `sha256sum`.
const NO_HASHER_MARK: &str = "MATRYOSHKA-NO-SHA256SUM";
/// The upload's answer, with the hash found, when the copy is not the runtime sent.
const MISMATCH_MARK: &str = "MATRYOSHKA-HASH-MISMATCH";

/// `safe PATH...` succeeds when each path (symlinks followed) is owned by the
/// login user (`test -O`, a builtin of dash, bash and busybox ash) and writable by
/// neither group nor others (`ls -ln` is POSIX, so this holds on coreutils,
/// busybox and BSD alike). One `ls` for all the paths and no `id` keep the warm
/// path at one more process; the login uid (`U`) is asked only to explain a refusal.
const SAFE_FN: &str = "safe() { for q; do [ -O \"$q\" ] || return 1; done; \
     L=$(ls -ldnL \"$@\" 2>/dev/null) || return 1; n=0; \
     while read -r m _; do \
     case \"$m\" in ?????-??-*) n=$((n+1)) ;; *) return 1 ;; esac; done <<EOF\n$L\nEOF\n\
     [ \"$n\" = \"$#\" ]; }";

/// The first exec: becomes the cached runtime `sha` when it is there for `arch`
/// in a safe cache, else prints the probe report (see [`parse_probe`]). The
/// cache folder `cache` is a shell word (quoted, or `"$HOME/..."`).
///
/// When the target is of `arch` and its cache is safe, the report ends with
/// [`RECEIVING_MARK`] and the codec the script chose (zstd where it has `zstd`,
/// else gzip), and the same exec goes on to take the runtime `sha` on its stdin
/// as [`upload`] does: it waits on its stdin while the client reads the report,
/// not one channel and shell later.
pub(super) fn warm_or_probe(cache: &str, sha: &str, arch: &str, verbose: &str) -> String {
    format!(
        "D={cache}; B=\"$D/bin/matryoshka-{sha}\"; {SAFE_FN}; A=$(uname -m); \
         if [ \"$A\" = {arch} ] && [ -x \"$B\" ] && safe \"$D\" \"$D/bin\" \"$B\"; then \
         exec \"$B\"{verbose} serve --stdio --cache-dir \"$D\"; fi; \
         echo {PROBE_MARK}; umask 077; mkdir -p \"$D/bin\" && echo \"$A\" && echo \"$D\" && \
         {{ for t in zstd openssl; do command -v $t > /dev/null 2>&1 && printf '%s ' $t; done; \
         echo .; }} && \
         if safe \"$D\" \"$D/bin\"; then \
         for f in \"$D\"/bin/matryoshka-*; do safe \"$f\" && echo \"${{f##*/}}\"; done; \
         if [ \"$A\" = {arch} ]; then \
         if command -v zstd > /dev/null 2>&1; then Z='{zstd}'; S={zst}; else Z='{gzip}'; S={gz}; fi; \
         if command -v openssl > /dev/null 2>&1; then K='{openssl}'; \
         elif command -v sha256sum > /dev/null 2>&1; then K={sha256sum}; else K=; fi; \
         if [ -n \"$K\" ]; then echo \"{RECEIVING_MARK} $S\"; set -e; {receive}; fi; fi; true; \
         else U=$(id -u); echo {UNSAFE_MARK}; for p in \"$D\" \"$D/bin\"; do safe \"$p\" || \
         {{ set -- $(ls -ldnL \"$p\"); echo \"$1 $3 $U $p\"; }}; done; fi",
        arch = super::sh_quote(arch),
        zstd = Codec::Zstd.unpack_command(),
        zst = Codec::Zstd.suffix(),
        gzip = Codec::Gzip.unpack_command(),
        gz = Codec::Gzip.suffix(),
        openssl = Tools::OPENSSL,
        sha256sum = Tools::SHA256SUM,
        receive = receive(sha),
    )
}

/// Takes the runtime `sha` compressed on stdin into `$B`: unpacked with `$Z`,
/// hashed with `$K`, kept with its compressed copy (`$B$S`) only when the hash
/// is `sha`, and nothing left behind otherwise. An unpacker that fails shows as
/// a hash that does not match.
///
/// Stdin goes to a file first and is unpacked from there, one step after the
/// other: a `tee | unpack | tee | hash` pipeline read sshd's pipe in small
/// turns on two cores and took 5.6 MB at ~37 MB/s; `cat` to a file drains it as
/// fast as sshd decrypts (first contact per hop below L0 245-281 ms -> 158-209 ms
/// here, docs/benchmarks.md).
fn receive(sha: &str) -> String {
    format!(
        "T=; C=; trap 'rm -f \"$T\" \"$C\"' EXIT; \
         T=$(mktemp \"$B.XXXXXX\"); C=$(mktemp \"$B$S.XXXXXX\"); cat > \"$C\"; $Z < \"$C\" > \"$T\" || true; \
         H=$($K < \"$T\"); H=${{H%% *}}; \
         [ \"$H\" = {sha} ] || {{ echo \"{MISMATCH_MARK} $H\"; exit 4; }}; \
         chmod 755 \"$T\"; mv \"$C\" \"$B$S\"; mv \"$T\" \"$B\"; trap - EXIT",
        sha = super::sh_quote(sha),
    )
}

/// What the probe found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Probe {
    /// The target's architecture, its cache folder, how a runtime copied there
    /// can be unpacked, and the runtimes in it that are safe to start (owned by
    /// the login user, writable by no one else).
    Ready {
        /// `uname -m`.
        arch: String,
        /// The cache folder, as the target's shell expanded it.
        dir: String,
        /// How a runtime copied there is unpacked and hashed.
        tools: Tools,
        /// File names in `<dir>/bin`.
        present: Vec<String>,
    },
    /// Cache folders that others could write to, each described.
    Unsafe(Vec<String>),
    /// An answer that is neither.
    Garbled(String),
}

/// Reads the probe report that follows [`PROBE_MARK`].
pub(super) fn parse_probe(report: &str) -> Probe {
    let mut lines = report.lines();
    let arch = lines.next().unwrap_or_default().trim().to_string();
    if arch.is_empty() || !arch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Probe::Garbled(format!("architecture `{arch}`"));
    }
    let dir = lines.next().unwrap_or_default().trim().to_string();
    let tools = match lines.next().and_then(|l| l.strip_suffix('.')) {
        Some(found) => Tools::from_found(found),
        None => return Probe::Garbled("no list of tools".into()),
    };
    let rest: Vec<&str> = lines
        .take_while(|l| !l.starts_with(RECEIVING_MARK))
        .collect();
    if rest.first() == Some(&UNSAFE_MARK) {
        return Probe::Unsafe(rest[1..].iter().map(|l| explain_unsafe(l)).collect());
    }
    Probe::Ready {
        arch,
        dir,
        tools,
        present: rest.iter().map(|l| l.to_string()).collect(),
    }
}

/// The codec the first exec unpacks the runtime with when its report ends with
/// [`RECEIVING_MARK`]: it then waits for the runtime on its stdin.
pub(super) fn receiving(report: &str) -> Option<Codec> {
    let line = report.lines().find(|l| l.starts_with(RECEIVING_MARK))?;
    match line[RECEIVING_MARK.len()..].trim() {
        s if s == Codec::Zstd.suffix() => Some(Codec::Zstd),
        s if s == Codec::Gzip.suffix() => Some(Codec::Gzip),
        _ => None,
    }
}

/// `drwxrwxrwx 1000 0 /path` (mode, owner, login uid, folder) in words.
fn explain_unsafe(line: &str) -> String {
    let mut fields = line.splitn(4, ' ');
    let (mode, owner, me, path) = (
        fields.next().unwrap_or_default(),
        fields.next().unwrap_or_default(),
        fields.next().unwrap_or_default(),
        fields.next().unwrap_or_default(),
    );
    let Some(bits) = mode_from_ls(mode) else {
        return format!("{path} ({mode})");
    };
    if owner != me {
        return format!(
            "{path} is owned by uid {owner}, not by uid {me} that the login user is \
             (fix: another folder with --remote-cache-dir)"
        );
    }
    let who = match (bits & 0o020 != 0, bits & 0o002 != 0) {
        (true, true) => "group and others",
        (true, false) => "its group",
        _ => "others",
    };
    format!(
        "{path} is mode {bits:04o} (writable by {who}) (fix: `chmod 700 {path}` there once you \
         trust what it holds, or another folder with --remote-cache-dir)"
    )
}

/// The mode bits of an `ls -l` mode string (`drwxr-sr-t` is 0o3755).
fn mode_from_ls(s: &str) -> Option<u32> {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() < 10 {
        return None;
    }
    let mut bits = 0;
    for (i, c) in chars[1..10].iter().enumerate() {
        let bit = 1 << (8 - i);
        let special = match i {
            2 => 0o4000,
            5 => 0o2000,
            8 => 0o1000,
            _ => 0,
        };
        bits |= match c {
            '-' => 0,
            'r' | 'w' | 'x' => bit,
            's' | 't' if special != 0 => bit | special,
            'S' | 'T' if special != 0 => special,
            _ => return None,
        };
    }
    Some(bits)
}

/// The tools a target has to take a runtime in, from the probe's list of the
/// optional ones it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tools {
    /// zstd when the target has `zstd`, else gzip.
    pub codec: Codec,
    /// `openssl dgst -sha256` when the target has `openssl` (three times faster
    /// than coreutils' `sha256sum` here: it uses the CPU's SHA instructions),
    /// else `sha256sum`.
    pub openssl: bool,
}

impl Tools {
    fn from_found(found: &str) -> Self {
        let has = |tool: &str| found.split_whitespace().any(|t| t == tool);
        Self {
            codec: if has("zstd") {
                Codec::Zstd
            } else {
                Codec::Gzip
            },
            openssl: has("openssl"),
        }
    }

    const OPENSSL: &str = "openssl dgst -sha256 -r";
    const SHA256SUM: &str = "sha256sum";

    /// The command that prints the sha256 of its standard input first on its line.
    fn hasher(self) -> &'static str {
        if self.openssl {
            Self::OPENSSL
        } else {
            Self::SHA256SUM
        }
    }
}

/// Takes the runtime compressed with `tools.codec` in from stdin, unpacks and
/// hashes it ([`receive`]), and puts it at `bin` only once its sha256 is `sha`;
/// on any failure nothing is left behind. The compressed copy is kept
/// beside it (`bin.zst` or `bin.gz`) for the next hop.
pub(super) fn upload(bin: &str, sha: &str, tools: Tools) -> String {
    format!(
        "set -e; umask 077; B={bin}; \
         command -v {hasher_name} > /dev/null 2>&1 || {{ cat > /dev/null; echo {NO_HASHER_MARK}; exit 3; }}; \
         Z='{unpack}'; S={suffix}; K='{hasher}'; {receive}",
        bin = super::sh_quote(bin),
        suffix = tools.codec.suffix(),
        unpack = tools.codec.unpack_command(),
        hasher = tools.hasher(),
        hasher_name = tools.hasher().split(' ').next().unwrap_or_default(),
        receive = receive(sha),
    )
}

/// Why [`upload`] failed, from its exit status and output; `source` names the
/// local file the copy came from, compressed with `codec`.
pub(super) fn upload_failure(
    status: Option<u32>,
    stdout: &str,
    stderr: &str,
    bin: &str,
    sha: &str,
    (source, codec): (&str, Codec),
) -> String {
    if stdout.contains(NO_HASHER_MARK) {
        return format!(
            "the target has neither `sha256sum` nor `openssl` to check the runtime copied to \
             {bin}, so it was not kept: install coreutils or busybox there"
        );
    }
    if let Some(found) = stdout
        .lines()
        .find_map(|l| l.strip_prefix(MISMATCH_MARK))
        .map(str::trim)
    {
        let said = match stderr.trim() {
            "" => String::new(),
            said => format!(" ({})", tail(said, 400)),
        };
        return format!(
            "the runtime copied to {bin} hashes to {found}, not {sha}, so it was not kept: it \
             was damaged on the way or did not unpack{said}, or the compressed copy sent \
             ({source}{suffix}) holds another binary than {source}",
            suffix = codec.suffix()
        );
    }
    let status = status.map_or("no exit status".to_string(), |s| format!("exit status {s}"));
    format!(
        "copying the runtime to {bin} failed ({status}): {}",
        tail(stderr.trim(), 400)
    )
}

/// The last `max` bytes of `text` (at a character boundary).
fn tail(text: &str, max: usize) -> &str {
    &text[text.ceil_char_boundary(text.len().saturating_sub(max))..]
}

#[cfg(test)]
mod tests;
